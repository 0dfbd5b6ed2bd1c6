// <switchboard-inbox>: a person's in-app inbox, served by Switchboard at
// /inbox/widget.js. No framework, no build step.
//
//   <script src="https://switchboard.example/inbox/widget.js" defer></script>
//   <switchboard-inbox token="sbr_…"></switchboard-inbox>
//
// `token` is a receiver token the page's own server minted for the signed-in
// person (`switchboard inbox token`, or POST
// /v1/accounts/{account}/inbox/{receiver}/token). `src` is the dispatcher's
// address, by default where this script came from. The bell shows the unread
// count; clicking it opens the panel: notifications newest first, each marked
// read when clicked, and "Mark all read". New notifications and count changes
// arrive live over /v1/inbox/stream; after a drop the stream resumes with
// Last-Event-ID (nothing left meanwhile is missed) and the list is read again
// (for what was read or archived meanwhile).
//
// Content is shown, never run: text and titles as text, Markdown as the HTML
// the dispatcher rendered and sanitised, action links only when http(s).
(() => {
  "use strict";
  const script = document.currentScript;
  const scriptOrigin = script && script.src ? new URL(script.src).origin : location.origin;

  const STYLE = `
    :host { position: relative; display: inline-block; font: 14px/1.4 system-ui, sans-serif; }
    button { font: inherit; cursor: pointer; }
    .bell { position: relative; background: none; border: 0; padding: 6px; color: inherit; line-height: 0; }
    .bell svg { width: 22px; height: 22px; fill: currentColor; }
    .badge { position: absolute; top: 0; right: 0; min-width: 16px; padding: 0 4px;
      border-radius: 8px; background: #c62828; color: #fff; font-size: 11px; line-height: 16px; }
    .badge[hidden] { display: none; }
    .panel { position: absolute; z-index: 1000; width: min(360px, 92vw); max-height: 70vh;
      overflow: auto; background: #fff; color: #222; border: 1px solid #ccc; border-radius: 6px;
      box-shadow: 0 4px 16px rgba(0,0,0,.15); }
    .panel[hidden] { display: none; }
    header { display: flex; justify-content: space-between; align-items: center;
      padding: 8px 12px; border-bottom: 1px solid #eee; font-weight: 600; }
    header button { background: none; border: 0; color: #1565c0; }
    ul { list-style: none; margin: 0; padding: 0; }
    li { padding: 10px 12px; border-bottom: 1px solid #f0f0f0; cursor: pointer; }
    li.unread { background: #f3f8ff; }
    li.unread .title::before { content: "● "; color: #1565c0; }
    .title { font-weight: 600; }
    .meta { color: #777; font-size: 12px; }
    .empty { padding: 16px 12px; color: #777; }
    .action { display: inline-block; margin-top: 6px; padding: 4px 10px; border-radius: 4px;
      background: #1565c0; color: #fff; text-decoration: none; }
    .body p { margin: 4px 0; }
  `;

  class SwitchboardInbox extends HTMLElement {
    constructor() {
      super();
      this.root = this.attachShadow({ mode: "open" });
      this.items = new Map(); // id -> notification
      this.lastEventId = null;
      this.unread = 0;
      this.abort = null;
      this.retry = 1000;
    }

    connectedCallback() {
      this.root.innerHTML = "";
      const style = document.createElement("style");
      style.textContent = STYLE;
      this.bell = el("button", "bell");
      // A bell drawn here: no icon font or emoji needed.
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("viewBox", "0 0 24 24");
      svg.setAttribute("aria-hidden", "true");
      const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
      path.setAttribute("d", "M12 22a2.5 2.5 0 0 0 2.45-2h-4.9A2.5 2.5 0 0 0 12 22zm7-6V11a7 7 0 0 0-5.5-6.84V3.5a1.5 1.5 0 0 0-3 0v.66A7 7 0 0 0 5 11v5l-2 2v1h18v-1l-2-2z");
      svg.append(path);
      this.bell.append(svg);
      this.bell.setAttribute("aria-label", "Notifications");
      this.bell.part = "bell";
      this.badge = el("span", "badge", "0");
      this.badge.hidden = true;
      this.bell.append(this.badge);
      this.panel = el("div", "panel");
      this.panel.hidden = true;
      const header = el("header", "", "");
      header.append(el("span", "", "Notifications"));
      this.readAllButton = el("button", "read-all", "Mark all read");
      header.append(this.readAllButton);
      this.list = el("ul", "list");
      this.panel.append(header, this.list);
      this.root.append(style, this.bell, this.panel);
      this.bell.addEventListener("click", () => this.toggle());
      this.readAllButton.addEventListener("click", () => this.post("/v1/inbox/read_all"));
      this.start();
    }

    // Opens the panel towards the wider side of the window, so it stays on
    // screen wherever the bell is.
    toggle() {
      this.panel.hidden = !this.panel.hidden;
      if (this.panel.hidden) return;
      const box = this.getBoundingClientRect();
      const leftHalf = box.left + box.width / 2 < window.innerWidth / 2;
      this.panel.style.left = leftHalf ? "0" : "auto";
      this.panel.style.right = leftHalf ? "auto" : "0";
    }

    disconnectedCallback() {
      if (this.abort) this.abort.abort();
      this.abort = null;
    }

    static get observedAttributes() { return ["token", "src"]; }

    attributeChangedCallback() {
      if (this.isConnected && this.bell) this.start();
    }

    get base() { return (this.getAttribute("src") || scriptOrigin).replace(/\/+$/, ""); }

    get token() { return this.getAttribute("token") || ""; }
    set token(value) { this.setAttribute("token", value); }

    headers(extra) {
      return Object.assign({ Authorization: "Bearer " + this.token }, extra || {});
    }

    // Opens the stream, then lists what was there before it: nothing made in
    // between is missed (what both show is shown once, by id).
    start() {
      if (this.abort) this.abort.abort();
      this.items.clear();
      this.lastEventId = null;
      this.render();
      if (!this.token) return;
      const abort = new AbortController();
      this.abort = abort;
      this.stream(abort);
    }

    async load(abort) {
      try {
        const response = await fetch(this.base + "/v1/inbox?limit=50",
          { headers: this.headers(), signal: abort.signal });
        if (!response.ok) throw new Error("listing: HTTP " + response.status);
        const page = await response.json();
        // The page is the state of what it lists; kept besides are only
        // those newer than its newest (streamed while it was read).
        const newest = page.notifications.length ? micros(page.notifications[0]) : 0;
        const fresh = [...this.items.values()].filter((n) => micros(n) > newest);
        this.items = new Map(page.notifications.map((n) => [n.id, n]));
        for (const n of fresh) this.items.set(n.id, n);
        this.setCount(page.unread);
        this.render();
      } catch (e) {
        if (!abort.signal.aborted) this.dispatchEvent(new CustomEvent("inbox-error", { detail: String(e) }));
      }
    }

    // Each connection, once its first counts arrive (it is watching), reads
    // the list: what the stream would not resend.
    async stream(abort) {
      let refused = 0;
      while (!abort.signal.aborted) {
        let opened = () => this.load(abort);
        try {
          const headers = this.headers({ Accept: "text/event-stream" });
          if (this.lastEventId) headers["Last-Event-ID"] = this.lastEventId;
          const response = await fetch(this.base + "/v1/inbox/stream",
            { headers, signal: abort.signal, cache: "no-store" });
          if (response.status === 401 || response.status === 403) {
            // A token minted a moment ago on another replica may not be
            // known here yet: a few tries before giving up.
            refused += 1;
            if (refused >= 4) {
              this.dispatchEvent(new CustomEvent("inbox-error", { detail: "the receiver token was refused" }));
              return;
            }
            throw new Error("stream: HTTP " + response.status);
          }
          refused = 0;
          if (!response.ok || !response.body) throw new Error("stream: HTTP " + response.status);
          this.retry = 1000;
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += value.replace(/\r\n?/g, "\n");
            let end;
            while ((end = buffer.indexOf("\n\n")) >= 0) {
              const block = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              if (this.onEvent(block, opened)) opened = null;
            }
          }
        } catch (e) {
          if (abort.signal.aborted) return;
        }
        // Dropped: come back where it left off.
        await new Promise((resolve) => setTimeout(resolve, this.retry));
        this.retry = Math.min(this.retry * 2, 30000);
      }
    }

    // Handles one event; whether it was the counts (which call `opened`).
    onEvent(block, opened) {
      let type = "message", data = "", id = null;
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") type = value;
        else if (field === "data") data += (data ? "\n" : "") + value;
        else if (field === "id") id = value;
      }
      if (id) this.lastEventId = id;
      if (!data) return false;
      const payload = JSON.parse(data);
      if (type === "notification" || type === "updated") {
        this.items.set(payload.id, payload);
        this.render();
        if (type === "notification") this.dispatchEvent(new CustomEvent("inbox-notification", { detail: payload }));
      } else if (type === "removed") {
        this.items.delete(payload.id);
        this.render();
      } else if (type === "count") {
        this.setCount(payload.unread);
        if (opened) opened();
        return true;
      } else if (type === "reset") {
        // More was missed than the stream resends: the list is read anew.
        this.items.clear();
      }
      return false;
    }

    setCount(unread) {
      this.unread = unread;
      this.badge.textContent = unread > 99 ? "99+" : String(unread);
      this.badge.hidden = unread === 0;
      this.bell.setAttribute("aria-label", "Notifications, " + unread + " unread");
    }

    async post(path) {
      try {
        const response = await fetch(this.base + path, { method: "POST", headers: this.headers() });
        if (!response.ok) throw new Error(path + ": HTTP " + response.status);
        return await response.json();
      } catch (e) {
        this.dispatchEvent(new CustomEvent("inbox-error", { detail: String(e) }));
        return null;
      }
    }

    async markRead(n) {
      if (n.read_at) return;
      const changed = await this.post("/v1/inbox/" + encodeURIComponent(n.id) + "/read");
      if (changed) { this.items.set(changed.id, changed); this.render(); }
    }

    render() {
      if (!this.list) return;
      const shown = [...this.items.values()]
        .filter((n) => !n.archived_at)
        .sort((a, b) => micros(b) - micros(a));
      this.list.replaceChildren();
      if (shown.length === 0) {
        this.list.append(el("li", "empty", "Nothing here yet."));
        return;
      }
      for (const n of shown) this.list.append(this.item(n));
    }

    item(n) {
      const li = el("li", n.read_at ? "read" : "unread");
      li.dataset.id = n.id;
      const c = n.content || {};
      const title = el("div", "title", c.content_type === "url_action" ? c.title : (n.sender || n.category));
      const body = el("div", "body");
      if (c.content_type === "markdown") {
        // Rendered and sanitised by the dispatcher (no scripts, no event
        // handlers, no images, links only http(s)/mailto).
        body.innerHTML = c.html;
      } else {
        body.textContent = c.body || "";
      }
      li.append(title, body);
      if (c.content_type === "url_action" && /^https?:\/\//i.test(c.url || "")) {
        const a = el("a", "action", c.action_label);
        a.href = c.url;
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        li.append(a);
      }
      li.append(el("div", "meta", new Date(n.created_at).toLocaleString()));
      li.addEventListener("click", () => this.markRead(n));
      return li;
    }
  }

  // When a notification was made, in microseconds: the inbox's own order
  // (each one a receiver gets is placed after the last).
  function micros(n) {
    const m = /\.(\d+)/.exec(n.created_at);
    const fraction = m ? (m[1] + "000000").slice(0, 6) : "000000";
    return Math.floor(Date.parse(n.created_at) / 1000) * 1e6 + Number(fraction);
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  if (!customElements.get("switchboard-inbox")) {
    customElements.define("switchboard-inbox", SwitchboardInbox);
  }
})();
