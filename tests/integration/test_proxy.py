"""The core promise, end to end: real echo backends in child processes, the proxy, real clients."""

from __future__ import annotations

import os
import queue
import socket
import urllib.error
import urllib.request
import uuid

import pytest
import websocket

from conftest import recv_close, stats, wait_for
from rawws import FakeBackend, RawClient, RecordingBackend, frame

from iwsproxy.tools.echo import EchoProcess
from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_TEXT, FrameParser


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def roundtrip(ws, payload):
    if isinstance(payload, bytes):
        ws.send_binary(payload)
    else:
        ws.send(payload)
    opcode, data = ws.recv_data()
    return opcode, data


def test_framing_is_preserved(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    ws = proxy.connect()
    assert roundtrip(ws, "héllo") == (websocket.ABNF.OPCODE_TEXT, "héllo".encode())
    assert roundtrip(ws, b"\x00\xff" * 10) == (websocket.ABNF.OPCODE_BINARY, b"\x00\xff" * 10)
    big = bytes(range(256)) * 4096  # 1 MiB binary
    assert roundtrip(ws, big) == (websocket.ABNF.OPCODE_BINARY, big)
    # a fragmented message arrives as one message
    ws.send_frame(websocket.ABNF.create_frame("part1-", websocket.ABNF.OPCODE_TEXT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame("part2", websocket.ABNF.OPCODE_CONT, fin=1))
    assert ws.recv_data() == (websocket.ABNF.OPCODE_TEXT, b"part1-part2")
    # ping from the client is answered by the proxy with the same payload
    ws.ping(b"are-you-there")
    frames = iter(lambda: ws.recv_data(control_frame=True), None)
    # the proxy's own pings (fences; websocket-client answers them) may come first
    assert next(f for f in frames if f[0] != websocket.ABNF.OPCODE_PING) == (websocket.ABNF.OPCODE_PONG,
                                                                             b"are-you-there")
    ws.close()


def test_client_survives_backend_kill_in_order_without_loss_or_duplicates(processes):
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    proxy = processes.proxy("--backend", a.url, "--backend", b.url)
    ws = proxy.connect()
    first = proxy.pipes()[0]["backend"]
    victim, survivor = (a, b) if first == a.url else (b, a)
    received = []
    for i in range(50):
        ws.send(f"m{i}")
        received.append(ws.recv())
    victim.kill()
    for i in range(50, 100):
        ws.send(f"m{i}")
        received.append(ws.recv())
    assert received == [f"m{i}" for i in range(100)]
    assert proxy.pipes()[0]["backend"] == survivor.url
    assert proxy.pipes()[0]["failovers"] == 1
    assert stats(survivor)["connections_total"] == 1
    ws.close()


def test_messages_sent_while_no_backend_are_flushed_first_in_order(processes):
    a = processes.echo(name="a")
    proxy = processes.proxy("--backend", a.url)
    ws = proxy.connect()
    assert roundtrip(ws, "before")[1] == b"before"
    a.kill()
    wait_for(lambda: proxy.pipes()[0]["state"] == "failing_over", what="the proxy to notice the kill")
    for i in range(10):
        ws.send(f"buffered-{i}")
    assert proxy.pipes()[0]["buffered_bytes"] > 0
    b = processes.echo(name="b")
    assert proxy.admin("POST", {"url": b.url})[0] == 201
    for i in range(10):
        ws.send(f"live-{i}")
    got = [ws.recv() for _ in range(20)]
    assert got == [f"buffered-{i}" for i in range(10)] + [f"live-{i}" for i in range(10)]
    headers = stats(b)["last_headers"]
    assert headers["x-iwsproxy-client-id"] == ws.client_id
    assert headers["x-iwsproxy-reconnects"] == "1"
    ws.close()


def test_buffer_overflow_closes_client_with_1013(processes):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url, "--buffer-limit", "64KiB")
    other = proxy.connect()
    ws = proxy.connect()
    a.kill()
    wait_for(lambda: all(p["state"] == "failing_over" for p in proxy.pipes()), what="failover state")
    chunk = b"x" * 16 * 1024
    try:
        for _ in range(8):  # 128 KiB > 64 KiB
            ws.send_binary(chunk)
    except OSError:
        # The proxy may close before the last chunks are written (then a reset fails the send);
        # its Close frame came first and stays in this socket's receive queue, read below.
        pass
    code, reason = recv_close(ws)
    assert code == 1013 and "buffer limit" in reason
    # the other client is untouched and recovers when a backend comes back
    b = processes.echo(name="b")
    proxy.admin("POST", {"url": b.url})
    assert roundtrip(other, "still here")[1] == b"still here"
    assert len(proxy.pipes()) == 1


def test_overflow_close_code(processes):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url, "--buffer-limit", "10KiB")
    ws = proxy.connect()
    a.kill()
    wait_for(lambda: proxy.pipes()[0]["state"] == "failing_over", what="failover state")
    ws.send_binary(b"y" * 6000)
    ws.send_binary(b"y" * 6000)
    assert recv_close(ws) == (1013, "buffer limit of 10240 bytes exceeded")
    wait_for(lambda: proxy.pipes() == [], what="the pipe to be gone")


def test_refusals_before_upgrade(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, "--on-duplicate", "refuse")
    with pytest.raises(websocket.WebSocketBadStatusException) as bad:
        websocket.create_connection(proxy.url_for("not-a-uuid"), timeout=5)
    assert bad.value.status_code == 400
    with pytest.raises(websocket.WebSocketBadStatusException) as v1:
        websocket.create_connection(proxy.url_for(str(uuid.uuid1())), timeout=5)
    assert v1.value.status_code == 400
    ws = proxy.connect()
    with pytest.raises(websocket.WebSocketBadStatusException) as dup:
        proxy.connect(ws.client_id)
    assert dup.value.status_code == 409
    assert roundtrip(ws, "first still works")[1] == b"first still works"
    with pytest.raises(urllib.error.HTTPError) as plain:
        urllib.request.urlopen(proxy.http_url + "/" + str(uuid.uuid4()), timeout=5)
    assert plain.value.code == 426
    assert b"WebSocket" in plain.value.read()


def test_no_backend_gives_503_and_backend_refusal_passes_through(processes):
    proxy = processes.proxy()
    with pytest.raises(websocket.WebSocketBadStatusException) as none:
        proxy.connect()
    assert none.value.status_code == 503
    refusing = processes.echo("--reject-status", "403")
    proxy.admin("POST", {"url": refusing.url})
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        proxy.connect()
    assert refused.value.status_code == 403


def test_subprotocol_headers_and_query_are_forwarded(processes):
    a = processes.echo("--subprotocol", "chat.v2", name="a")
    b = processes.echo("--subprotocol", "chat.v2", name="b")
    proxy = processes.proxy("--backend", a.url, "--backend", b.url)
    ws = websocket.create_connection(proxy.url_for(str(uuid.uuid4()) + "?room=7"), timeout=5,
                                     subprotocols=["chat.v1", "chat.v2"],
                                     header=["Authorization: Bearer user-token"], cookie="session=abc")
    assert ws.getsubprotocol() == "chat.v2"
    first = proxy.pipes()[0]["backend"]
    served = a if first == a.url else b
    seen = stats(served)
    assert seen["last_path"].endswith("?room=7")
    assert seen["last_headers"]["authorization"] == "Bearer user-token"
    assert seen["last_headers"]["cookie"] == "session=abc"
    assert seen["last_headers"]["x-iwsproxy-reconnects"] == "0"
    ws.close()


def test_query_and_forwarded_headers_reach_the_backend_byte_for_byte(processes):
    backend = RecordingBackend()
    try:
        proxy = processes.proxy("--backend", backend.url, "--resume-secret", "s3cret", "--allowed-origin", "*")
        client = RawClient(proxy.port, "/" + str(uuid.uuid4()) + "?name=\xc3\xa9&token=t&b=%7E+c&flag")
        assert client.handshake(Cookie="a=\xc3\xa9; b=\"q\"", Authorization="Bearer \xe2\x82\xac",
                                Origin="https://\xc3\xa9.test") == 101
        head = backend.requests.get(timeout=10)
        assert b"GET /?name=\xc3\xa9&b=%7E+c&flag HTTP/1.1\r\n" in head  # the token taken out, the rest as sent
        assert b"\r\nCookie: a=\xc3\xa9; b=\"q\"\r\n" in head
        assert b"\r\nAuthorization: Bearer \xe2\x82\xac\r\n" in head
        assert b"\r\nOrigin: https://\xc3\xa9.test\r\n" in head
        client.close()
        # a cookie that is not UTF-8 could not pass unchanged: it alone is left out
        client = RawClient(proxy.port)
        assert client.handshake(Cookie="a=1; legacy=caf\xe9; b=2") == 101
        assert b"\r\nCookie: a=1; b=2\r\n" in backend.requests.get(timeout=10)
        client.close()
        client = RawClient(proxy.port)
        assert client.handshake(Cookie="legacy=caf\xe9") == 101
        assert b"\r\nCookie:" not in backend.requests.get(timeout=10)
        client.close()
    finally:
        backend.close()


def test_later_backend_must_accept_the_same_subprotocol(processes):
    a = processes.echo("--subprotocol", "chat.v2", name="a")
    proxy = processes.proxy("--backend", a.url, "--max-failures", "1")
    ws = websocket.create_connection(proxy.url_for(str(uuid.uuid4())), timeout=5, subprotocols=["chat.v2"])
    wrong = processes.echo("--subprotocol", "other", name="wrong")
    proxy.admin("POST", {"url": wrong.url})
    a.kill()
    wait_for(lambda: proxy.backends()[wrong.url]["total_failures"] >= 1, what="the mismatch to be refused")
    right = processes.echo("--subprotocol", "chat.v2", name="right")
    proxy.admin("POST", {"url": right.url})
    assert roundtrip(ws, "hello")[1] == b"hello"
    assert proxy.pipes()[0]["backend"] == right.url


def test_a_session_without_subprotocol_keeps_none_after_a_failover(processes):
    a = processes.echo(name="a")  # chooses no subprotocol
    proxy = processes.proxy("--backend", a.url)
    client = RawClient(proxy.port)  # websocket-client refuses a 101 that chose none of its offer
    try:
        assert client.handshake(**{"Sec-WebSocket-Protocol": "chat.v2"}) == 101  # told: none chosen
        b = processes.echo("--subprotocol", "chat.v2", name="b")  # would choose chat.v2 if offered it
        proxy.admin("POST", {"url": b.url})
        a.kill()
        client.send(frame(OP_TEXT, b"after the failover"))
        assert client.data_events() == [(OP_TEXT, b"after the failover")]
        assert proxy.pipes()[0]["backend"] == b.url
        assert "sec-websocket-protocol" not in stats(b)["last_headers"]  # not offered: none chosen
    finally:
        client.close()


def test_exclusive_policy_one_client_per_backend(processes):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url, "--pool-policy", "exclusive")
    first = proxy.connect()
    with pytest.raises(websocket.WebSocketBadStatusException) as busy:
        proxy.connect()
    assert busy.value.status_code == 503
    first.close()
    wait_for(lambda: proxy.backends()[a.url]["clients"] == 0, what="the backend to be free")
    second = proxy.connect()
    assert roundtrip(second, "mine now")[1] == b"mine now"


def test_a_backend_removed_and_added_again_keeps_an_exact_count_of_its_clients(processes):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url, "--pool-policy", "exclusive")
    old = proxy.connect()
    assert proxy.admin("DELETE", {"url": a.url})[0] == 200  # old keeps its connection
    assert proxy.admin("POST", {"url": a.url})[0] == 201    # a new backend at the same URL
    new = proxy.connect()
    assert proxy.backends()[a.url]["clients"] == 1
    old.close()  # leaves the removed backend, not the new one
    wait_for(lambda: len(proxy.pipes()) == 1, what="the old pipe to end")
    assert proxy.backends()[a.url]["clients"] == 1
    with pytest.raises(websocket.WebSocketBadStatusException) as busy:
        proxy.connect()  # still one client per backend
    assert busy.value.status_code == 503
    assert roundtrip(new, "still mine")[1] == b"still mine"


def test_exclusive_policy_waits_buffering_when_asked(processes):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url, "--pool-policy", "exclusive", "--wait-for-backend")
    first = proxy.connect()
    waiting = proxy.connect()
    for i in range(5):
        waiting.send(f"queued-{i}")
    assert roundtrip(first, "first")[1] == b"first"
    first.close()
    assert [waiting.recv() for _ in range(5)] == [f"queued-{i}" for i in range(5)]


def test_a_client_answered_while_waiting_keeps_no_subprotocol(processes):
    a = processes.echo("--subprotocol", "chat.v2")  # would choose chat.v2 if offered it
    proxy = processes.proxy("--backend", a.url, "--pool-policy", "exclusive", "--wait-for-backend")
    first = proxy.connect()
    waiting = RawClient(proxy.port)  # answered at once, with no backend: so with no subprotocol
    try:
        assert waiting.handshake(**{"Sec-WebSocket-Protocol": "chat.v2"}) == 101
        first.close()
        waiting.send(frame(OP_TEXT, b"once a backend is free"))
        assert waiting.data_events() == [(OP_TEXT, b"once a backend is free")]
        assert "sec-websocket-protocol" not in stats(a)["last_headers"]
    finally:
        waiting.close()


def test_failing_backend_is_ejected_after_repeated_failures(processes):
    good = processes.echo()
    dead_port = free_port()
    dead = f"ws://127.0.0.1:{dead_port}"
    proxy = processes.proxy("--backend", dead, "--backend", good.url, "--max-failures", "2", "--eject-base", "30",
                            "--eject-max", "60")
    clients = [proxy.connect() for _ in range(4)]
    for ws in clients:
        assert roundtrip(ws, "ok")[1] == b"ok"
    state = proxy.backends()
    assert state[dead]["state"] == "ejected"
    assert state[dead]["total_failures"] == 2
    assert state[good.url]["clients"] == 4


def test_backend_close_1000_ends_the_session_other_codes_fail_over(processes):
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    proxy = processes.proxy("--backend", a.url, "--backend", b.url)
    ws = proxy.connect()
    first = proxy.pipes()[0]["backend"]
    victim = a if first == a.url else b
    victim.terminate()  # SIGTERM: the echo server closes its connections with 1001 (going away)
    assert roundtrip(ws, "after graceful close")[1] == b"after graceful close"
    assert proxy.pipes()[0]["failovers"] == 1


def test_client_close_closes_backend_and_frees_everything(processes):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url)
    clients = [proxy.connect() for _ in range(5)]
    assert stats(a)["connections_open"] == 5
    for ws in clients:
        ws.close(status=1000)
    wait_for(lambda: stats(a)["connections_open"] == 0, what="backend connections to close")
    wait_for(lambda: proxy.pipes() == [], what="pipes to end")
    assert proxy.backends()[a.url]["clients"] == 0


def test_admin_api_auth_and_validation(processes):
    a = processes.echo()
    proxy = processes.proxy()
    assert proxy.admin("GET", token=None)[0] == 401
    assert proxy.admin("GET", token="wrong")[0] == 401
    assert proxy.admin("POST", {"url": "http://example.test/"})[0] == 400
    assert proxy.admin("POST", {"url": "ws://"})[0] == 400
    assert proxy.admin("POST", {"nope": 1})[0] == 400
    assert proxy.admin("POST", {"url": a.url}) == (201, {"url": a.url, "pool": "default", "added": True})
    assert proxy.admin("POST", {"url": a.url}) == (200, {"url": a.url, "pool": "default", "added": False})
    assert list(proxy.backends()) == [a.url]
    ws = proxy.connect()
    assert roundtrip(ws, "x")[1] == b"x"
    assert proxy.admin("DELETE", {"url": a.url})[0] == 200
    assert proxy.admin("DELETE", {"url": a.url})[0] == 404
    assert proxy.backends() == {}
    assert roundtrip(ws, "existing pipe keeps its backend")[1] == b"existing pipe keeps its backend"
    with urllib.request.urlopen(proxy.http_url + "/healthz", timeout=5) as resp:
        assert resp.status == 200


def test_admin_routes_off_without_token(processes):
    proxy = processes.proxy(admin_token=None)
    assert proxy.admin("GET")[0] == 404


def test_no_greenlet_or_socket_outlives_its_pipe_on_any_exit_path(processes):
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    proxy = processes.proxy("--backend", a.url, "--backend", b.url, "--buffer-limit", "8KiB",
                            "--resume-grace", "0.5")
    fds = lambda: len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))  # noqa: E731
    warm = proxy.connect()
    assert roundtrip(warm, "warm up")[1] == b"warm up"
    warm.close()
    wait_for(lambda: proxy.pipes() == [], what="warm-up pipe to end")
    base_fds, base_greenlets = fds(), proxy.admin("GET", path="/admin/status")[1]["greenlets"]

    normal = proxy.connect()                       # 1: normal close
    abrupt = proxy.connect()                       # 2: client TCP drop, never resumed (grace expires)
    refused = None
    overflow = proxy.connect()                     # 3: buffer overflow after its backend dies
    for ws in (normal, abrupt, overflow):
        assert roundtrip(ws, "hi")[1] == b"hi"
    normal.close()
    abrupt.sock.shutdown(socket.SHUT_RDWR)
    abrupt.sock.close()
    a.kill()
    b.kill()
    wait_for(lambda: all(p["backend_state"] == "failing_over" for p in proxy.pipes()), what="failover state")
    overflow.send_binary(b"z" * 9000)              # an empty buffer takes one message past its cap
    overflow.send_binary(b"z")                     # a backlog past it takes no more
    assert recv_close(overflow)[0] == 1013
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        proxy.connect()                            # 4: refused before the upgrade (no backend)
    assert refused.value.status_code == 503
    wait_for(lambda: proxy.pipes() == [], what="all pipes to end")
    # the last greenlets of a pipe (its supervisor, a lingering close) finish just after it is forgotten
    wait_for(lambda: proxy.admin("GET", path="/admin/status")[1]["greenlets"] <= base_greenlets,
             what="pipe greenlets to end")
    wait_for(lambda: fds() <= base_fds, what="sockets to be closed")


def test_reconnect_deadline_closes_with_1013(processes):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url, "--reconnect-deadline", "0.5")
    ws = proxy.connect()
    assert roundtrip(ws, "before")[1] == b"before"
    a.kill()
    assert recv_close(ws) == (1013, "no backend within 0.5 s")
    wait_for(lambda: proxy.pipes() == [], what="the pipe to end")


class EndingBackend(FakeBackend):
    """Ends the session with Close 1000 at the first message, then reports what the proxy sent
    back: its Close reply, then the end of the connection."""

    def __init__(self):
        self.seen: queue.Queue = queue.Queue()
        super().__init__()

    def _serve(self, conn):
        self._handshake(conn)
        conn.settimeout(10)
        parser = FrameParser(expect_masked=True)
        try:
            while not any(op in (OP_TEXT, OP_BINARY) for op, _ in parser.feed(conn.recv(65536))):
                pass
            conn.sendall(frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye", mask=False))
            while True:
                data = conn.recv(65536)
                if not data:
                    self.seen.put("eof")
                    return
                for op, payload in parser.feed(data):
                    if op == OP_CLOSE:
                        self.seen.put(("close", int.from_bytes(payload[:2], "big")))
        except OSError as exc:
            self.seen.put(repr(exc))


def test_backend_ending_the_session_gets_its_close_reply_and_its_socket_closed(processes):
    ending = EndingBackend()
    try:
        proxy = processes.proxy("--backend", ending.url)
        ws = proxy.connect()
        ws.send("the last message")
        assert recv_close(ws) == (1000, "bye")  # the application's code and reason
        assert ending.seen.get(timeout=10) == ("close", 1000)  # the handshake completed
        assert ending.seen.get(timeout=10) == "eof"  # and the proxy let go of the connection
        wait_for(lambda: proxy.pipes() == [], what="the pipe to end")
        assert proxy.backends()[ending.url]["clients"] == 0
    finally:
        ending.close()


def test_a_pipe_goes_back_to_the_backend_it_lost_when_no_other_is_up(processes):
    port = free_port()
    a = processes.add(EchoProcess("--port", str(port), name="a"))
    down = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    proxy = processes.proxy("--backend", a.url, "--backend", down)
    ws = proxy.connect()
    assert roundtrip(ws, "before")[1] == b"before"
    a.kill()
    # the first round after the loss tries the other backend only; the rounds after it try both
    processes.add(EchoProcess("--port", str(port), name="a again"))
    ws.send("after")
    assert ws.recv() == "after"
    assert proxy.pipes()[0]["backend"] == a.url

