// The live events page: rows arrive over Server-Sent Events and are added
// at the top of the table (text only, never markup). EventSource reconnects
// by itself when the server goes away.
"use strict";
(function () {
  const table = document.getElementById("tail");
  if (!table) return;
  const account = table.dataset.account;
  const body = table.tBodies[0];
  const state = document.getElementById("tail-state");
  const KEPT = 200;
  const url = "/console/accounts/" + encodeURIComponent(account) + "/tail/stream" + location.search;
  const source = new EventSource(url);
  source.addEventListener("open", function () {
    state.textContent = "Watching: new events appear at the top.";
  });
  source.addEventListener("error", function () {
    state.textContent = "Connection lost; reconnecting…";
  });
  source.addEventListener("dropped", function (e) {
    const n = JSON.parse(e.data).dropped;
    state.textContent = "This page fell behind: up to " + n + " rows were skipped (the events were handled).";
  });
  source.addEventListener("handled", function (e) {
    const row = JSON.parse(e.data);
    const tr = document.createElement("tr");
    tr.className = "tail-row status-" + row.status;
    const cell = function (text) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
      return td;
    };
    cell(row.at.replace("T", " ").replace(/\.\d+/, "")).className = "nowrap";
    const link = document.createElement("a");
    link.href = "/console/accounts/" + encodeURIComponent(account) + "/events/" + encodeURIComponent(row.id);
    link.textContent = row.conversation_type + " / " + row.event_type;
    cell("").appendChild(link);
    cell(row.conversation_key);
    cell(row.status);
    cell(row.chains.map(function (c) {
      return c.name + ": " + c.outcome + (c.step ? " at " + c.step : "");
    }).join(", ") || "none");
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > KEPT) body.deleteRow(body.rows.length - 1);
  });
})();
