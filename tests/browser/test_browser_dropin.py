"""A browser page written for a plain WebSocket service, unchanged, behind the proxy.

The page does what any page does: ``new WebSocket(url)``, and on close, a new one. The proxy
assigns the id in a cookie (``--assign-client-id``); when the network drops (a TCP relay between
the browser and the proxy cuts the connection without a Close) the page's reconnect carries the
cookie and resumes its session: the same backend connection, nothing lost.
"""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from conftest import wait_for
from iwsproxy.tools.process import ChildProcess

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips these tests, or fails them in CI
    expect = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>plain client</title></head>
<body>
  <p>opens: <span id="opens">0</span></p>
  <ol id="messages"></ol>
  <script>
    "use strict";
    let socket = null;
    function start(url) {
      socket = new WebSocket(url);
      socket.onopen = () => {
        const opens = document.getElementById("opens");
        opens.textContent = String(Number(opens.textContent) + 1);
      };
      socket.onmessage = (event) => {
        const li = document.createElement("li");
        li.textContent = event.data;
        document.getElementById("messages").append(li);
      };
      socket.onclose = () => { setTimeout(() => start(url), 100); };
    }
    function send(n) { socket.send(String(n)); }
  </script>
</body></html>
"""


class Relay:
    """A TCP relay on 127.0.0.1:0 to ``port``: the network between the browser and the proxy.

    :meth:`black_hole` makes it drop what the proxy sends (kept in :attr:`dropped`), as a network
    that has gone away does; :meth:`cut` closes every connection, with no Close frame."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.dropping = threading.Event()
        self.dropped = b""
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                browser, _ = self.listener.accept()
            except OSError:
                return
            proxy = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [browser, proxy]
            self._spawn(self._pump, browser, proxy, False)
            self._spawn(self._pump, proxy, browser, True)

    def _pump(self, source: socket.socket, sink: socket.socket, from_proxy: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_proxy and self.dropping.is_set():
                    self.dropped += data
                else:
                    sink.sendall(data)
        except OSError:
            pass

    def black_hole(self) -> None:
        self.dropping.set()

    def cut(self) -> None:
        self.dropping.clear()
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
        except OSError:
            pass
        self.listener.close()
        self.cut()
        for thread in self.threads:
            thread.join(timeout=5)
        assert not any(thread.is_alive() for thread in self.threads)


@pytest.fixture
def relay():
    relays: list[Relay] = []
    yield lambda port: relays.append(Relay(port)) or relays[-1]
    for each in relays:
        each.close()


@pytest.mark.timeout(90)
def test_a_plain_page_resumes_through_the_assigned_cookie_after_the_network_drops(processes, page, serve_html,
                                                                                   relay):
    env = {"PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    backend = processes.add(ChildProcess("websockets_backend", "websockets", env=env, name="websockets"))
    page_url = serve_html(PAGE)
    origin = page_url.rstrip("/")
    proxy = processes.proxy("--backend", backend.url, "--allowed-origin", origin,
                            "--client-id-from", "cookie:sid", "--assign-client-id")
    network = relay(proxy.port)
    page.goto(page_url)
    page.evaluate("url => start(url)", f"ws://127.0.0.1:{network.port}/chat?room=7")
    messages = page.locator("#messages li")
    expect(page.locator("#opens")).to_have_text("1")
    expect(messages).to_have_count(1)
    report = json.loads(messages.first.text_content())
    assert report["path"] == "/chat?room=7"  # the page's own path and query, unchanged
    client_id = report["client_id"]
    [cookie] = page.context.cookies()
    assert (cookie["name"], cookie["value"], cookie["httpOnly"], cookie["sameSite"]) == ("sid", client_id, True, "Strict")
    assert "sid=" not in page.evaluate("document.cookie")  # HttpOnly: no script reads it
    for n in range(1, 6):
        page.evaluate("n => send(n)", n)
    expect(messages).to_have_count(6)

    network.black_hole()  # the network goes away: what the proxy sends from now on is lost
    for n in range(6, 11):
        page.evaluate("n => send(n)", n)
    echoes = [b"\x81" + bytes([len(str(n))]) + str(n).encode() for n in range(6, 11)]
    wait_for(lambda: all(echo in network.dropped for echo in echoes), what="the echoes of 6-10 to be lost")
    network.cut()  # no Close: the page sees 1006 and reconnects, with its cookie
    expect(page.locator("#opens")).to_have_text("2")
    page.evaluate("n => send(n)", 11)
    expect(messages.last).to_have_text("11")
    texts = messages.all_text_contents()
    assert list(dict.fromkeys(texts[1:])) == [str(n) for n in range(1, 12)]  # nothing lost, in order
    assert sum(text.startswith("{") for text in texts) == 1  # one backend connection: the session resumed
    [pipe] = proxy.pipes()
    assert pipe["failovers"] == 0
    counters = proxy.admin("GET", path="/admin/status")[1]["counters"]
    assert counters.get("clients_resumed", 0) + counters.get("clients_takeover", 0) == 1, counters
