"""Hostile input: each malformed case gets the exact close code or HTTP status, and a
well-behaved session through the same proxy loses nothing meanwhile."""

from __future__ import annotations

import socket
import threading
import urllib.request
import uuid

import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from conftest import recv_close, wait_for
from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT
from rawws import DeafBackend, FakeBackend, RawClient, RecordingBackend, frame
from streams import StreamingClient


@pytest.fixture(scope="module")
def hostile_setup(tmp_path_factory):
    """One proxy for the module, with small limits, and a steady well-behaved stream through it."""
    from conftest import EchoProcess, Proxy
    backend = EchoProcess(name="echo").start()
    proxy = Proxy("--backend", backend.url, "--max-message-size", "64KiB", "--max-fragments", "8",
                  "--handshake-timeout", "1", "--max-pipes-per-ip", "1000",
                  "--allowed-origin", "https://app.example.com", "--allowed-origin", "https://*.trusted.test").start()
    stop = threading.Event()
    witness = StreamingClient(proxy.url, 0.005, stop).start()
    yield proxy, witness
    stop.set()
    witness.finish()
    assert witness.error is None and witness.closed_with is None
    assert witness.lost() == 0 and witness.duplicates() == 0
    assert witness.first_deliveries() == list(range(witness.sent))
    assert witness.sent > 50
    witness.close()
    proxy.terminate()
    backend.terminate()


def rest_until_eof(client: RawClient) -> bytes:
    """What the proxy sends after the status line's head, up to its end of the connection."""
    data, client.rest = client.rest, b""
    while chunk := client.sock.recv(4096):
        data += chunk
    return data


def upgraded(proxy) -> RawClient:
    client = RawClient(proxy.port)
    assert client.handshake() == 101
    return client


CASES = [
    ("unmasked client frame", frame(OP_TEXT, b"hi", mask=False), 1002),
    ("reserved bits without an extension", frame(OP_TEXT, b"hi", rsv=4), 1002),
    ("unknown opcode", frame(0x3, b"hi"), 1002),
    ("unknown control opcode", frame(0xB, b""), 1002),
    ("control frame over 125 bytes", frame(OP_PING, b"x" * 126), 1002),
    ("fragmented control frame", frame(OP_PING, b"x", fin=False), 1002),
    ("continuation without a start", frame(OP_CONT, b"x"), 1002),
    ("new message inside a fragmented one", frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), 1002),
    ("invalid UTF-8 text", frame(OP_TEXT, b"\xff\xfe"), 1007),
    ("invalid UTF-8 across fragments", frame(OP_TEXT, b"\xe2\x82", fin=False) + frame(OP_CONT, b"(", fin=True), 1007),
    ("invalid UTF-8 close reason", frame(OP_CLOSE, b"\x03\xe8\xff"), 1007),
    ("close code 999", frame(OP_CLOSE, (999).to_bytes(2, "big")), 1002),
    ("close code 1005 on the wire", frame(OP_CLOSE, (1005).to_bytes(2, "big")), 1002),
    ("one-byte close payload", frame(OP_CLOSE, b"\x03"), 1002),
    ("declared 2**40-byte frame (no payload sent)", frame(OP_BINARY, b"", length=2 ** 40)[:10], 1009),
    ("64-bit length with the top bit set", b"\x82\xff" + (2 ** 63).to_bytes(8, "big"), 1002),
    ("message over the size limit", frame(OP_BINARY, b"x" * (64 * 1024 + 1)), 1009),
    ("fragments over the size limit",
     frame(OP_BINARY, b"x" * 40000, fin=False) + frame(OP_CONT, b"x" * 40000), 1009),
    ("too many fragments", b"".join(frame(OP_CONT if i else OP_TEXT, b"x", fin=False) for i in range(9)), 1008),
]


@pytest.mark.parametrize("name, data, code", CASES, ids=[c[0] for c in CASES])
def test_protocol_violation_gets_its_close_code(hostile_setup, name, data, code):
    proxy, _ = hostile_setup
    client = upgraded(proxy)
    client.send(data)
    assert client.close_code() == code
    client.close()


def test_ping_is_answered_with_the_same_payload_and_close_is_completed(hostile_setup):
    proxy, _ = hostile_setup
    client = upgraded(proxy)
    client.send(frame(OP_PING, b"payload-123"))
    pongs = []
    while not pongs:
        pongs = [p for op, p in client.events() if op == OP_PONG]
    assert pongs == [b"payload-123"]
    client.send(frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye"))
    assert client.close_code() == 1000
    assert client.at_eof()


def test_good_messages_before_a_violation_still_reach_the_backend(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    client = upgraded(proxy)
    client.send(frame(OP_TEXT, b"first") + frame(OP_TEXT, b"second") + frame(OP_TEXT, b"x", mask=False))
    assert client.close_code() == 1002
    wait_for(lambda: backend.stats()["messages_total"] == 2, what="the two good messages at the backend")


def test_messages_before_a_close_in_the_same_write_are_delivered_and_nothing_after_it(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    client = upgraded(proxy)
    wait_for(lambda: backend.stats()["connections_open"] == 1, what="the backend connection")
    client.send(frame(OP_TEXT, b"first") + frame(OP_PING, b"p") + frame(OP_TEXT, b"second")
                + frame(OP_CLOSE, (1000).to_bytes(2, "big")) + frame(OP_TEXT, b"after the close"))
    assert client.close_code() == 1000
    wait_for(lambda: backend.stats()["connections_open"] == 0, what="the backend closed after what came before")
    assert backend.stats()["messages_total"] == 2


@pytest.mark.parametrize("headers, status", [
    ({"Sec-WebSocket-Version": "8"}, 426),
    ({"Sec-WebSocket-Key": "short"}, 400),
    ({"Sec-WebSocket-Key": None}, 400),
    ({"Origin": "https://evil.test"}, 403),
    ({"Origin": "https://app.example.com.evil.test"}, 403),
    ({"Origin": "https://app.example.com"}, 101),
    ({"Origin": "https://a.trusted.test"}, 101),
    ({"Origin": "https://trusted.test"}, 403),
    ({"Sec-WebSocket-Protocol": "chat.v1, chat.v2"}, 101),
    ({"Sec-WebSocket-Protocol": "chat.v1, caf\xc3\xa9"}, 400),   # not a token: it could not be forwarded as is
    ({"Sec-WebSocket-Protocol": "chat.v1, a b"}, 400),
    ({"Cookie": "a=\xc3\xa9"}, 101),                            # forwarded (Cookie) and UTF-8: passed on as sent
    ({"Cookie": "a=\xff"}, 101),                                 # not UTF-8: that cookie is left out (test_proxy)
    ({"Authorization": "Basic \xff"}, 400),
    ({"User-Agent": "\xff"}, 101),                               # not forwarded: no matter
])
def test_bad_handshakes_get_an_http_status(hostile_setup, headers, status):
    proxy, _ = hostile_setup
    client = RawClient(proxy.port)
    assert client.handshake(**headers) == status
    client.close()


@pytest.mark.parametrize("headers, body", [
    ({"Content-Length": "5"}, b"abcde"),
    ({"Transfer-Encoding": "chunked"}, b"5\r\nabcde\r\n0\r\n\r\n"),
], ids=["content-length", "chunked"])
def test_upgrade_with_a_body_gets_400_and_its_bytes_are_not_frames(hostile_setup, headers, body):
    proxy, _ = hostile_setup
    logged = len(proxy.stderr_text())
    client = RawClient(proxy.port, timeout=5)
    client.request(client.upgrade_request(**headers) + body + frame(OP_TEXT, b"after the body"))
    assert client.read_status() == 400
    assert b"no body" in rest_until_eof(client)
    assert "Traceback" not in proxy.stderr_text()[logged:]
    for zero in ("0", "00"):                         # an empty body is no body
        empty = RawClient(proxy.port)
        assert empty.handshake(**{"Content-Length": zero}) == 101
        empty.send(frame(OP_TEXT, b"served"))
        assert (OP_TEXT, b"served") in empty.events()  # (a keepalive Ping may come with it)
        empty.close()


@pytest.mark.parametrize("path, upgrade", [("/{id}?name=\xff", True), ("/{id}?token=\xff", True),
                                           ("/admin/?token=\xff", False)])
def test_a_query_that_is_not_utf8_gets_400(hostile_setup, path, upgrade):
    proxy, _ = hostile_setup
    logged = len(proxy.stderr_text())
    client = RawClient(proxy.port, path.format(id=uuid.uuid4()))
    if upgrade:
        assert client.handshake() == 400
    else:                                           # the status page reads ?token= too
        client.request(f"GET {client.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode("latin-1"))
        assert client.read_status() == 400
    assert b"not UTF-8" in rest_until_eof(client)
    assert "Traceback" not in proxy.stderr_text()[logged:]


INJECTIONS = [
    ("/{id}", {"Cookie": "a=1\r\n X-Injected: fold"}),            # obsolete line folding
    ("/{id}", {"Authorization": "Basic YTpi\r\n\tX-Injected: fold"}),
    ("/{id}", {"Origin": "https://app.test\r\n X-Injected: fold"}),
    ("/{id}", {"Sec-WebSocket-Protocol": "chat\r\n X-Injected: fold"}),
    ("/{id}", {"Cookie": "a=1\x00X-Injected: nul"}),
    ("/{id}?a=\x00X-Injected", {}),
]


def test_line_breaks_and_nul_in_headers_get_400_and_never_reach_the_backend(processes):
    backend = RecordingBackend()
    try:
        proxy = processes.proxy("--backend", backend.url, "--allowed-origin", "*")
        for path, headers in INJECTIONS:
            client = RawClient(proxy.port, path.format(id=uuid.uuid4()))
            assert client.handshake(**headers) == 400, (path, headers)
            assert b"CR, LF or NUL" in rest_until_eof(client)
        client = RawClient(proxy.port)
        assert client.handshake(Cookie="a=1") == 101
        head = backend.requests.get(timeout=10)       # the first request the backend saw: this one
        assert b"\r\nCookie: a=1\r\n" in head and b"X-Injected" not in head
        assert backend.requests.empty()
        client.close()
        assert "Traceback" not in proxy.stderr_text()
    finally:
        backend.close()


@pytest.mark.parametrize("headers, status", [
    ({f"X-Pad-{i}": "p" * 1000 for i in range(40)}, 431),     # 40 KiB of headers: over the 32 KiB cap
    ({"X-Pad": "p" * 70_000}, 431),                            # one line over it (and over gevent's 64 KiB)
    ({f"X-Pad-{i}": "p" for i in range(101)}, 431),            # over gevent's 100 lines (was 400 and a traceback)
    ({f"X-Pad-{i}": "p" * 1000 for i in range(30)}, 101),     # 30 KiB: under the cap
])
def test_request_headers_over_the_cap_get_431(hostile_setup, headers, status):
    proxy, _ = hostile_setup
    logged = len(proxy.stderr_text())
    client = RawClient(proxy.port)
    assert client.handshake(**headers) == status
    if status == 431:
        assert rest_until_eof(client) == b"request header fields too large\n"
    assert "Traceback" not in proxy.stderr_text()[logged:]
    client.close()


def test_non_uuid_and_path_tricks_get_400(hostile_setup):
    proxy, _ = hostile_setup
    for path in ("/not-a-uuid", "/" + str(uuid.uuid4()).upper().replace("-", ""), "/%00", "/" + "a" * 5000):
        client = RawClient(proxy.port, path)
        assert client.handshake() in (400, 404, 414)
        client.close()


def test_slow_request_line_is_dropped(hostile_setup):
    proxy, _ = hostile_setup
    client = RawClient(proxy.port, timeout=5)
    client.request(b"GET /")                         # and never the rest
    assert client.at_eof()                           # within the 1 s handshake timeout (socket timeout 5 s)


def test_incomplete_headers_are_dropped(hostile_setup):
    proxy, _ = hostile_setup
    client = RawClient(proxy.port, timeout=5)
    client.request(b"GET /" + str(uuid.uuid4()).encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websock")
    data = b""
    while True:
        try:
            chunk = client.sock.recv(4096)
        except socket.timeout:
            pytest.fail("the proxy kept an incomplete request open")
        if not chunk:
            break
        data += chunk
    assert data == b"" or data.startswith(b"HTTP/1.1 400")


def test_many_bad_clients_at_once_do_not_disturb_the_witness(hostile_setup):
    proxy, witness = hostile_setup
    before = witness.distinct()
    clients = [upgraded(proxy) for _ in range(30)]
    for i, client in enumerate(clients):
        client.send(CASES[i % len(CASES)][1])
    for i, client in enumerate(clients):
        assert client.close_code() == CASES[i % len(CASES)][2]
        client.close()
    wait_for(lambda: witness.distinct() >= before + 20, what="the witness stream to keep flowing")


def test_per_ip_limit_answers_429(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, "--max-pipes-per-ip", "2")
    first, second = proxy.connect(), proxy.connect()
    with pytest.raises(websocket.WebSocketBadStatusException) as third:
        proxy.connect()
    assert third.value.status_code == 429
    first.close()
    wait_for(lambda: len(proxy.pipes()) == 1, what="the first pipe to end")
    again = proxy.connect()
    again.send("ok")
    assert again.recv() == "ok"
    second.close()
    again.close()


def test_per_ip_limit_trusts_x_forwarded_for_only_behind_trusted_proxies(processes):
    backend = processes.echo()
    direct = processes.proxy("--backend", backend.url, "--max-pipes-per-ip", "1")
    spoofer = direct.connect(header=["X-Forwarded-For: 203.0.113.1"])
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        direct.connect(header=["X-Forwarded-For: 203.0.113.2"])  # a forged header changes nothing
    assert refused.value.status_code == 429
    spoofer.close()

    behind = processes.proxy("--backend", backend.url, "--max-pipes-per-ip", "1", "--trusted-proxy-hops", "1")
    # the balancer appends the address it saw; what the client sent before it is not trusted
    one = behind.connect(header=["X-Forwarded-For: 198.51.100.9, 203.0.113.1"])
    other = behind.connect(header=["X-Forwarded-For: 203.0.113.2"])
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        behind.connect(header=["X-Forwarded-For: 198.51.100.10, 203.0.113.1"])
    assert refused.value.status_code == 429
    for ws in (one, other):
        ws.send("served")
        assert ws.recv() == "served"
        ws.close()


def clients_closed(proxy) -> dict[tuple[str, str], float]:
    """``iwsproxy_clients_closed_total`` as {(code, reason): count}, scraped from the proxy."""
    with urllib.request.urlopen(proxy.http_url + "/metrics", timeout=5) as resp:
        families = text_string_to_metric_families(resp.read().decode())
    return {(s.labels["code"], s.labels["reason"]): s.value for family in families for s in family.samples
            if s.name == "iwsproxy_clients_closed_total"}


def test_idle_timeout_closes_with_1001(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, "--idle-timeout", "0.5")
    ws = proxy.connect()
    ws.send("active")
    assert ws.recv() == "active"
    assert recv_close(ws) == (1001, "idle for 0.5 s")
    assert clients_closed(proxy) == {("1001", "idle"): 1}  # the session's end cause, not the code's going_away


def test_global_buffer_budget_refuses_new_buffering_with_1013(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, "--global-buffer-limit", "100KiB",
                            "--buffer-limit", "80KiB", "--max-message-size", "64KiB")
    a, b = proxy.connect(), proxy.connect()
    backend.kill()
    wait_for(lambda: all(p["backend_state"] == "failing_over" for p in proxy.pipes()), what="failover state")
    a.send_binary(b"a" * 60 * 1024)                  # within a's cap and within the budget
    wait_for(lambda: sum(p["buffered_bytes"] for p in proxy.pipes()) >= 60 * 1024, what="a's buffer")
    b.send_binary(b"b" * 60 * 1024)                  # within b's cap, but past the process budget
    assert recv_close(b) == (1013, "proxy buffer budget exhausted")
    assert clients_closed(proxy) == {("1013", "overflow"): 1}  # the process budget is an overflow, like a cap
    fresh = processes.echo(name="fresh")
    proxy.admin("POST", {"url": fresh.url})
    a.send("still here")
    got = [a.recv_data()[1] for _ in range(2)]
    assert got == [b"a" * 60 * 1024, b"still here"]


def test_admin_failures_are_rate_limited_and_urls_checked_against_the_allowlist(processes):
    proxy = processes.proxy("--backend-allowlist", "127.0.0.1", "--backend-allowlist", "10.0.0.0/8")
    status = [proxy.admin("GET", token="wrong")[0] for _ in range(11)]
    assert status[:10] == [401] * 10 and status[10] == 429
    assert proxy.admin("GET")[0] == 429               # even the right token waits out the block
    other = processes.proxy("--backend-allowlist", "127.0.0.1:9", "--backend-allowlist", "10.0.0.0/8")
    assert other.admin("POST", {"url": "ws://169.254.169.254/latest"})[0] == 403
    assert other.admin("POST", {"url": "ws://127.0.0.1:10/x"})[0] == 403
    assert other.admin("POST", {"url": "ws://127.0.0.1:9/x"})[0] == 201
    assert other.admin("POST", {"url": "ws://10.1.2.3:9000/"})[0] == 201


SilentBackend = FakeBackend


class EvilBackend(FakeBackend):
    """Completes the handshake, then sends a masked frame (servers must not mask)."""

    def _serve(self, conn):
        self._handshake(conn)
        conn.sendall(frame(OP_TEXT, b"masked by a server", mask=True))


def test_backend_stuck_in_its_handshake_fails_without_stalling_others(processes):
    good = processes.echo()
    silent = SilentBackend()
    try:
        proxy = processes.proxy("--backend", good.url, "--connect-timeout", "1")
        busy = proxy.connect()
        proxy.admin("POST", {"url": silent.url})
        results = {}

        def newcomer():
            ws = proxy.connect(timeout=10)            # may try the silent backend first: 1 s, then the good one
            ws.send("late")
            results["newcomer"] = ws.recv()
            ws.close()

        thread = threading.Thread(target=newcomer)
        thread.start()
        for i in range(50):                           # meanwhile the busy client is served without a stall
            busy.send(str(i))
            assert busy.recv() == str(i)
        thread.join(15)
        assert results == {"newcomer": "late"}
        busy.close()
    finally:
        silent.close()


def test_backend_breaking_the_protocol_is_failed_over(processes):
    good = processes.echo(name="good")
    evil = EvilBackend()
    try:
        proxy = processes.proxy("--backend", evil.url, "--backend", good.url)
        ws = proxy.connect()
        ws.send("hello")
        assert ws.recv() == "hello"                  # served by the good backend after the evil one misbehaved
        assert proxy.pipes()[0]["backend"] == good.url or proxy.pipes()[0]["failovers"] >= 1
        ws.close()
    finally:
        evil.close()


def test_backend_that_never_answers_pings_is_failed_and_its_window_replayed(processes):
    deaf = DeafBackend()
    try:
        good = processes.echo(name="good")  # started first: it is added well within the pong timeout
        proxy = processes.proxy("--backend", deaf.url, "--pong-timeout", "1")
        ws = proxy.connect()
        for i in range(5):
            ws.send(f"m{i}")                          # written to the deaf backend, never acknowledged
        proxy.admin("POST", {"url": good.url})
        assert [ws.recv() for _ in range(5)] == [f"m{i}" for i in range(5)]  # replayed after the pong timeout
        pipe = proxy.pipes()[0]
        assert (pipe["backend"], pipe["failovers"], pipe["replayed"]) == (good.url, 1, 5)
        ws.close()
    finally:
        deaf.close()


def test_an_idle_pipe_notices_a_deaf_backend_by_its_keepalive(processes):
    deaf = DeafBackend()
    try:
        good = processes.echo(name="good")
        proxy = processes.proxy("--backend", deaf.url, "--keepalive", "0.3", "--pong-timeout", "0.5")
        ws = proxy.connect()  # and stays quiet: only the keepalive fence can tell
        proxy.admin("POST", {"url": good.url})
        wait_for(lambda: proxy.pipes()[0]["backend"] == good.url, timeout=10, what="the idle pipe to move")
        # once if the good backend was added in time, more if the deaf one had to be retried alone first
        assert proxy.pipes()[0]["failovers"] >= 1
        ws.send("still here")
        assert ws.recv() == "still here"
        ws.close()
    finally:
        deaf.close()
