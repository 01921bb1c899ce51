"""Session resume: a client that drops and comes back with its id gets its session back."""

from __future__ import annotations

import socket
import threading
import uuid

import pytest
import websocket

from conftest import recv_close, stats, wait_for
from rawws import DeafBackend, FakeBackend
from iwsproxy.tokens import sign


def drop(ws: websocket.WebSocket) -> None:
    """Vanish without a Close frame, as a phone changing networks does."""
    ws.sock.shutdown(socket.SHUT_RDWR)
    ws.sock.close()


def numbers(ws: websocket.WebSocket, until: int) -> list[int]:
    """Read stream numbers until ``until`` has been seen (pings are answered by websocket-client)."""
    got = []
    while not got or got[-1] < until:
        got.append(int(ws.recv()))
    return got


def first_deliveries(received: list[int]) -> list[int]:
    seen, order = set(), []
    for n in received:
        if n not in seen:
            seen.add(n)
            order.append(n)
    return order


def test_dropped_client_resumes_the_stream_in_order_and_the_backend_never_notices(processes):
    backend = processes.echo("--stream-interval-ms", "5")
    proxy = processes.proxy("--backend", backend.url)
    ws = proxy.connect()
    before = numbers(ws, 50)
    drop(ws)
    wait_for(lambda: proxy.pipes()[0]["state"] == "detached", what="the pipe to detach")
    wait_for(lambda: proxy.pipes()[0]["buffered_to_client_bytes"] > 0, what="the backend's stream to be buffered")
    again = proxy.connect(ws.client_id)
    after = numbers(again, before[-1] + 100)
    received = before + after
    order = first_deliveries(received)
    assert order == list(range(1, order[-1] + 1)), "every number once at least, in order"
    duplicates = len(received) - len(order)
    print(f"\nresume: {len(order)} numbers, {duplicates} duplicates")
    assert stats(backend)["connections_total"] == 1
    assert proxy.pipes()[0]["resumes"] == 1
    again.close()


def end_while_detached(processes, stream_interval_ms: str, *proxy_args: str):
    """A streaming session whose client drops and never comes back, until the proxy ends it."""
    backend = processes.echo("--stream-interval-ms", stream_interval_ms)
    proxy = processes.proxy("--backend", backend.url, *proxy_args)
    ws = proxy.connect()
    numbers(ws, 3)
    drop(ws)
    wait_for(lambda: stats(backend)["connections_open"] == 0, what="the backend connection to close")
    assert proxy.pipes() == []
    return backend, proxy, ws.client_id


def test_grace_expiry_closes_the_backend(processes):
    backend, proxy, client_id = end_while_detached(processes, "5", "--resume-grace", "0.5")
    status = proxy.admin("GET", path="/admin/status")[1]
    assert status["counters"]["clients_expired"] == 1
    fresh = proxy.connect(client_id)                # a new session, not a resume
    assert int(fresh.recv()) == 1
    assert stats(backend)["connections_total"] == 2
    fresh.close()


def test_normal_close_ends_the_session_at_once(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    ws = proxy.connect()
    ws.send("x")
    assert ws.recv() == "x"
    ws.close(status=1000)
    assert stats(backend)["connections_open"] == 0 or wait_for(
        lambda: stats(backend)["connections_open"] == 0, what="backend closed")
    wait_for(lambda: proxy.pipes() == [], what="the pipe to end")


def test_a_new_connection_takes_over_a_live_session(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    old = proxy.connect()
    old.send("from old")
    assert old.recv() == "from old"
    new = proxy.connect(old.client_id)
    assert recv_close(old) == (4409, "session taken over by a new connection")
    new.send("from new")
    got = [new.recv()]
    if got == ["from old"]:                          # the old connection never acknowledged it
        got.append(new.recv())
    assert got[-1] == "from new"
    assert stats(backend)["connections_total"] == 1
    status = proxy.admin("GET", path="/admin/status")[1]
    assert status["counters"]["clients_takeover"] == 1
    assert status["clients_closed_by_code"] == {"4409": 1}
    new.close()


def test_resume_needs_the_signed_token_when_a_secret_is_set(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, "--resume-secret", "s3cret")
    ws = proxy.connect()                             # a new session needs no token
    ws.send("a")
    assert ws.recv() == "a"
    drop(ws)
    wait_for(lambda: proxy.pipes()[0]["state"] == "detached", what="the pipe to detach")
    for token in (None, "0" * 64, sign("other", ws.client_id), "%C3%A9"):  # (a non-ASCII token was a 500)
        suffix = f"?token={token}" if token else ""
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(proxy.url_for(ws.client_id + suffix), timeout=5)
        assert refused.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(proxy.url_for(ws.client_id), timeout=5, header=["X-Iwsproxy-Token: \u00ff"])
    assert refused.value.status_code == 403
    again = websocket.create_connection(proxy.url_for(ws.client_id), timeout=5,
                                        header=[f"X-Iwsproxy-Token: {sign('s3cret', ws.client_id)}"])
    again.send("b")
    got = [again.recv()]
    if got == ["a"]:                                 # unacknowledged before the drop: delivered again
        got.append(again.recv())
    assert got[-1] == "b"
    assert stats(backend)["last_path"] == "/"       # the token was not forwarded
    again.close()


def test_backend_kill_and_client_drop_in_one_session_lose_nothing(processes):
    a = processes.echo("--work-ms", "20", name="a")
    b = processes.echo("--work-ms", "20", name="b")
    proxy = processes.proxy("--backend", a.url, "--backend", b.url)
    ws = proxy.connect()
    received = []
    for i in range(20):
        ws.send(str(i))
        received.append(int(ws.recv()))
    for i in range(20, 30):                          # in flight when everything breaks
        ws.send(str(i))
    drop(ws)
    serving = proxy.pipes()[0]["backend"]
    (a if serving == a.url else b).kill()
    wait_for(lambda: proxy.pipes()[0]["backend"] not in (None, serving), what="the failover")
    again = proxy.connect(ws.client_id)
    for i in range(30, 40):
        again.send(str(i))
    while not received or max(received) < 39:
        received.append(int(again.recv()))
    order = first_deliveries(received)
    assert order == list(range(40))
    print(f"\ncombined: 40 messages, {len(received) - 40} duplicates")
    again.close()


def test_buffer_overflow_while_detached_ends_the_session_and_is_counted(processes):
    _, proxy, _ = end_while_detached(processes, "1", "--buffer-limit", "2KiB")
    counters = proxy.admin("GET", path="/admin/status")[1]["counters"]
    assert counters["clients_overflow"] == 1 and "clients_expired" not in counters


class SlowBackend(FakeBackend):
    """Completes its handshake only when ``go`` is set; then stays quiet."""

    def __init__(self):
        self.go = threading.Event()
        super().__init__()

    def _serve(self, conn):
        if self.go.wait(20):
            self._handshake(conn)


def test_a_second_connection_while_the_first_waits_for_its_backend_is_refused(processes):
    slow = SlowBackend()
    try:
        proxy = processes.proxy("--backend", slow.url)
        client_id = str(uuid.uuid4())
        first: dict = {}
        opening = threading.Thread(target=lambda: first.setdefault("ws", proxy.connect(client_id, timeout=20)))
        opening.start()
        wait_for(lambda: slow.connections, what="the first connection's backend handshake to start")
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            proxy.connect(client_id)  # no session to resume or take over yet: its outcome is not known
        assert refused.value.status_code == 409
        slow.go.set()
        opening.join(20)
        assert [p["state"] for p in proxy.pipes()] == ["connected"]  # the first got its session
        first["ws"].close()
    finally:
        slow.go.set()
        slow.close()


def test_a_reconnect_while_the_old_session_tears_down_gets_a_new_session(processes):
    deaf = DeafBackend()
    try:
        good = processes.echo(name="good")
        proxy = processes.proxy("--backend", deaf.url)
        client_id = str(uuid.uuid4())
        ws = proxy.connect(client_id)
        proxy.admin("POST", {"url": good.url})
        proxy.admin("DELETE", {"url": deaf.url})
        ws.close()  # the session ends; the pipe waits for the deaf backend's Close reply (2 s)
        again = proxy.connect(client_id)
        again.send("new session")
        assert again.recv() == "new session"
        assert stats(good)["last_headers"]["x-iwsproxy-reconnects"] == "0"  # a new session, not a resume
        again.close()
    finally:
        deaf.close()
