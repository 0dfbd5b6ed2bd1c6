// The new-chain form previews itself: half a second after an edit, the
// form is posted for a preview (a dry run, nothing saved) and the preview
// section is replaced by the server's. Without JavaScript the Preview
// button does the same.
"use strict";
(function () {
  const form = document.getElementById("new-chain");
  if (!form) return;
  let timer = null;
  let asked = 0;
  form.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(preview, 500);
  });
  async function preview() {
    const n = ++asked;
    const data = new FormData(form);
    data.set("action", "preview");
    let response;
    try {
      // Not form.action: the buttons named "action" shadow it.
      response = await fetch(form.getAttribute("action"), {
        method: "POST",
        body: new URLSearchParams(data),
        credentials: "same-origin",
      });
    } catch (e) {
      return;
    }
    if (!response.ok || n !== asked) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.getElementById("preview");
    const old = document.getElementById("preview");
    if (fresh && old) old.replaceWith(document.adoptNode(fresh));
  }
})();
