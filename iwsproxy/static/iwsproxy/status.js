// The iwsproxy status page: refreshes the backends and pipes tables every second.
//
// The server renders the first paint (templates/iwsproxy/status.html) and, after
// checking the admin token, puts it and the API's URL in <meta> tags. This script
// reads GET <admin>/backends with that token as a bearer header, then rebuilds both
// tables with textContent only (never innerHTML: URLs and errors are untrusted text).
// The next refresh is scheduled when the previous one has finished, so a slow proxy
// never has more than one request from this page in flight.
"use strict";

(function () {
  const REFRESH_MS = 1000;
  const REQUEST_TIMEOUT_MS = 5000;

  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const token = meta("iwsproxy-admin-token");
  const backendsUrl = meta("iwsproxy-backends-url");
  const $ = (id) => document.getElementById(id);

  // cell formats: the same as the template's
  const dash = (value) => (value === null || value === undefined ? "—" : String(value));
  const oneDecimal = (value) => (value === null || value === undefined ? "—" : value.toFixed(1));

  // [field, text(row), css class]
  const BACKEND_COLUMNS = [
    ["url", (b) => b.url, "mono"],
    ["pool", (b) => dash(b.pool), "mono"],
    ["state", (b) => (b.ejected_for_s === null ? b.state : `${b.state} (${oneDecimal(b.ejected_for_s)} s left)`), ""],
    ["failures", (b) => `${b.consecutive_failures} / ${b.total_failures}`, "num"],
    ["ejections", (b) => String(b.ejections), "num"],
    ["clients", (b) => `${b.clients} / ${b.pipes}`, "num"],
  ];
  const PIPE_COLUMNS = [
    ["client", (p) => p.client, "mono"],
    ["state", (p) => p.state, ""],
    ["backend", (p) => dash(p.backend), "mono"],
    ["pool", (p) => dash(p.pool), "mono"],
    ["host", (p) => dash(p.host), "mono"],
    ["buffered_bytes", (p) => String(p.buffered_bytes), "num"],
    ["failovers", (p) => String(p.failovers), "num"],
    ["last_move_ms", (p) => oneDecimal(p.last_move_ms), "num"],
  ];

  function row(item, columns, key, keyValue) {
    const tr = document.createElement("tr");
    tr.className = `state-${item.state}`;
    tr.dataset[key] = keyValue;
    for (const [field, text, css] of columns) {
      const td = document.createElement("td");
      td.dataset.field = field;
      if (css) td.className = css;
      td.textContent = text(item);
      tr.append(td);
    }
    return tr;
  }

  function fill(tableId, countId, items, columns, key, keyOf, emptyText) {
    const rows = items.map((item) => row(item, columns, key, keyOf(item)));
    if (rows.length === 0) {
      const td = document.createElement("td");
      td.className = "empty";
      td.colSpan = columns.length;
      td.textContent = emptyText;
      const tr = document.createElement("tr");
      tr.append(td);
      rows.push(tr);
    }
    $(tableId).tBodies[0].replaceChildren(...rows);
    $(countId).textContent = String(items.length);
  }

  function showRefreshed(when) {
    const time = $("refreshed");
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString();
  }

  function showError(message) {
    const error = $("error");
    if (message === null) {
      error.hidden = true;
      error.textContent = "";
      $("tables").classList.remove("stale");
    } else {
      error.textContent = `Refresh failed at ${new Date().toLocaleTimeString()}: ${message}. ` +
        "The tables show the last data received; retrying every second.";
      error.hidden = false;
      $("tables").classList.add("stale");
    }
  }

  async function refresh() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    try {
      const response = await fetch(backendsUrl, {
        headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        signal: abort.signal,
      });
      if (!response.ok) {
        throw new Error(`HTTP ${response.status} ${response.statusText}`.trim());
      }
      const data = await response.json();
      fill("backends", "backend-count", data.backends, BACKEND_COLUMNS, "url", (b) => b.url, "no backends");
      fill("pipes", "pipe-count", data.pipes, PIPE_COLUMNS, "client", (p) => p.client, "no live pipes");
      showRefreshed(new Date());
      showError(null);
    } catch (err) {
      showError(err.name === "AbortError" ? `no answer within ${REQUEST_TIMEOUT_MS / 1000} s` : err.message);
    } finally {
      clearTimeout(timer);
      setTimeout(refresh, REFRESH_MS);
    }
  }

  setTimeout(refresh, REFRESH_MS);
})();
