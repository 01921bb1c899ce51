"""A browser's own WebSocket through the proxy: it stays open while its backend is SIGKILLed."""

from __future__ import annotations

import uuid

import pytest

from conftest import wait_for

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips these tests, or fails them in CI
    expect = None

# A page served from 127.0.0.1 (so the upgrade carries a real Origin): it echoes
# nothing itself, it records what its socket does into the DOM.
ECHO_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>browser client</title></head>
<body>
  <p>socket: <span id="socket">not opened</span></p>
  <p>close events: <span id="closes">0</span> <span id="closed"></span></p>
  <p>error events: <span id="errors">0</span></p>
  <ol id="echoes"></ol>
  <script>
    "use strict";
    let socket = null;
    function openSocket(url) {
      socket = new WebSocket(url);
      socket.onopen = () => { document.getElementById("socket").textContent = "open"; };
      socket.onmessage = (event) => {
        const li = document.createElement("li");
        li.textContent = event.data;
        document.getElementById("echoes").append(li);
      };
      socket.onerror = () => {
        const errors = document.getElementById("errors");
        errors.textContent = String(Number(errors.textContent) + 1);
      };
      socket.onclose = (event) => {
        const closes = document.getElementById("closes");
        closes.textContent = String(Number(closes.textContent) + 1);
        document.getElementById("closed").textContent = `code=${event.code} reason=${event.reason}`;
        document.getElementById("socket").textContent = "closed";
      };
    }
    function sendNumber(n) { socket.send(String(n)); }
    function readyState() { return socket.readyState; }
  </script>
</body></html>
"""


@pytest.mark.timeout(60)
def test_browser_websocket_stays_open_while_its_backend_is_killed(processes, page, serve_html):
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    page_url = serve_html(ECHO_PAGE)
    origin = page_url.rstrip("/")
    # the page comes from another port: a cross-origin page must be allowed explicitly
    proxy = processes.proxy("--backend", a.url, "--backend", b.url, "--allowed-origin", origin)
    page.goto(page_url)
    assert page.evaluate("location.origin") == origin
    client_id = str(uuid.uuid4())
    page.evaluate("url => openSocket(url)", proxy.url_for(client_id))
    expect(page.locator("#socket")).to_have_text("open")
    echoes = page.locator("#echoes li")

    for n in range(1, 21):
        page.evaluate("n => sendNumber(n)", n)
    expect(echoes).to_have_text([str(n) for n in range(1, 21)])
    [pipe] = proxy.pipes()
    victim, survivor = (a, b) if pipe["backend"] == a.url else (b, a)
    assert victim.stats()["last_headers"]["origin"] == origin  # passed on to the backend
    # every message proven read by the victim: nothing left to replay, so nothing can arrive twice
    wait_for(lambda: proxy.pipes()[0]["buffered_bytes"] == 0, what="the backend to confirm the messages")

    victim.kill()
    for n in range(21, 41):  # written to the dead backend or buffered: replayed / flushed to the next
        page.evaluate("n => sendNumber(n)", n)
    expect(echoes).to_have_text([str(n) for n in range(1, 41)], timeout=15_000)

    expect(page.locator("#closes")).to_have_text("0")
    expect(page.locator("#errors")).to_have_text("0")
    expect(page.locator("#socket")).to_have_text("open")
    assert page.evaluate("readyState()") == 1  # WebSocket.OPEN
    [pipe] = proxy.pipes()
    assert pipe["backend"] == survivor.url
    assert pipe["failovers"] == 1
    assert survivor.stats()["connections_total"] == 1
