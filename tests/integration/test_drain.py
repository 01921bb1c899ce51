"""Planned drain: every pipe moves off a backend with nothing lost and nothing doubled."""

from __future__ import annotations

import threading

import pytest

from conftest import stats, wait_for
from rawws import FakeBackend, frame
from streams import StreamingClient

from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, FrameParser


def test_drain_moves_every_pipe_without_loss_or_duplicates(processes):
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    proxy = processes.proxy("--backend", a.url, "--backend", b.url)
    stop = threading.Event()
    clients = [StreamingClient(proxy.url, 0.005, stop).start() for _ in range(10)]
    wait_for(lambda: all(c.distinct() >= 20 for c in clients), what="streams to flow")
    on_a = [p for p in proxy.pipes() if p["backend"] == a.url]
    assert len(on_a) == 5
    status, body = proxy.admin("DELETE", {"url": a.url, "drain": True, "window_s": 1.0})
    assert (status, body["pipes"]) == (202, 5)
    assert proxy.backends()[a.url]["state"] == "draining"
    wait_for(lambda: a.url not in proxy.backends(), what="the drained backend to leave the pool")
    after = {c: c.distinct() for c in clients}
    wait_for(lambda: all(c.distinct() >= after[c] + 20 for c in clients), what="streams to flow after the move")
    stop.set()
    for c in clients:
        c.finish()
    for c in clients:
        assert c.error is None, c.error
        assert c.lost() == 0
        assert c.duplicates() == 0
        assert c.first_deliveries() == list(range(c.sent))
    pipes = proxy.pipes()
    assert all(p["backend"] == b.url for p in pipes)
    moved = [p for p in pipes if p["failovers"] == 1]
    assert len(moved) == 5 and all(p["last_move_ms"] is not None for p in moved)
    assert stats(a)["connections_open"] == 0
    assert stats(a)["connections_total"] == 5
    for c in clients:
        c.close()


@pytest.mark.parametrize("window_s", [float("inf"), float("nan"), 1e16, 86401, -1, True, "5"])
def test_a_drain_window_that_is_not_seconds_from_0_to_a_day_is_refused_before_anything_changes(shared, window_s):
    url = "ws://127.0.0.1:9/"
    proxy = shared.proxy("--backend", url)  # one for every case: each checks that nothing changed
    status, body = proxy.admin("DELETE", {"url": url, "drain": True, "window_s": window_s})
    assert status == 400 and "window_s" in body["error"], body
    assert proxy.backends()[url]["state"] == "up"


class PingOnCloseBackend(FakeBackend):
    """Echoes data; answers the proxy's Close with a Ping first, then its Close reply."""

    def _serve(self, conn):
        self._handshake(conn)
        conn.settimeout(10)
        parser = FrameParser(expect_masked=True)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for op, payload in parser.feed(data):
                    if op in (OP_TEXT, OP_BINARY):
                        conn.sendall(frame(op, payload, mask=False))
                    elif op == OP_CLOSE:
                        conn.sendall(frame(OP_PING, b"still there?", mask=False))
                        conn.sendall(frame(OP_CLOSE, payload[:2], mask=False))
        except OSError:
            pass


def test_a_ping_from_a_draining_backend_does_not_turn_the_drain_into_a_failover(processes):
    pinging = PingOnCloseBackend()
    try:
        b = processes.echo(name="b")
        proxy = processes.proxy("--backend", pinging.url)
        ws = proxy.connect()
        for i in range(5):
            ws.send(f"m{i}")
            assert ws.recv() == f"m{i}"
        proxy.admin("POST", {"url": b.url})
        assert proxy.admin("DELETE", {"url": pinging.url, "drain": True, "window_s": 0.1})[0] == 202
        wait_for(lambda: proxy.pipes()[0]["backend"] == b.url, what="the pipe to move")
        # the Close reply proved all five read: a clean move replays nothing (a failover would
        # replay the five unacknowledged messages, and the client would get their echoes again)
        assert proxy.pipes()[0]["replayed"] == 0
        ws.send("after")
        assert ws.recv() == "after"
        assert stats(b)["messages_total"] == 1
    finally:
        pinging.close()


class HeldHandshakeBackend(PingOnCloseBackend):
    """Completes its handshake only once ``release`` is set; then as PingOnCloseBackend."""

    def __init__(self):
        self.accepted = threading.Event()
        self.release = threading.Event()
        super().__init__()

    def _serve(self, conn):
        threading.Thread(target=self._serve_later, args=(conn,), daemon=True).start()

    def _serve_later(self, conn):
        self.accepted.set()
        if self.release.wait(10):
            super()._serve(conn)


def test_a_pipe_still_connecting_to_a_drained_backend_moves_off_it(processes):
    held = HeldHandshakeBackend()
    try:
        b = processes.echo(name="b")
        proxy = processes.proxy("--backend", held.url)
        opened: dict = {}
        opener = threading.Thread(target=lambda: opened.setdefault("ws", proxy.connect()), daemon=True)
        opener.start()
        assert held.accepted.wait(10)  # the pipe's handshake with it is under way
        proxy.admin("POST", {"url": b.url})
        status, body = proxy.admin("DELETE", {"url": held.url, "drain": True, "window_s": 0.1})
        assert (status, body["pipes"]) == (202, 0)  # not on it yet
        held.release.set()
        opener.join(10)
        wait_for(lambda: proxy.pipes()[0]["backend"] == b.url, what="the pipe to move")
        wait_for(lambda: held.url not in proxy.backends(), what="the drained backend to leave the pool")
        ws = opened["ws"]
        ws.send("after")
        assert ws.recv() == "after"
        ws.close()
    finally:
        held.close()
