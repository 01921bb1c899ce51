"""Integration tests of the echo backend: a real child process, real websocket-client clients."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

import pytest
import websocket

from iwsproxy.tools.echo import EchoProcess, accept_key
from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_TEXT, FrameParser, MaskSource, encode_frame

TIMEOUT_S = 5


@pytest.fixture
def start_echo():
    """Start EchoProcess(*args); every one started is terminated and reaped at teardown."""
    started: list[EchoProcess] = []

    def start(*args: str, name: str = "echo") -> EchoProcess:
        echo = EchoProcess(*args, name=name).start()
        started.append(echo)
        return echo

    yield start
    for echo in started:
        echo.terminate()
        assert echo.proc.poll() is not None


@pytest.fixture(scope="module")
def echo():
    """One echo backend for the module's tests that need no fresh one of their own (those that read
    its stats, kill or stop it start one with ``start_echo``)."""
    with EchoProcess(name="echo") as shared:
        yield shared
    assert shared.proc.poll() is not None


def connect(url: str, **kwargs) -> websocket.WebSocket:
    return websocket.create_connection(url, timeout=TIMEOUT_S, **kwargs)


def close_code(frame: websocket.ABNF) -> int:
    assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
    return struct.unpack("!H", frame.data[:2])[0]


def raw_upgrade(port: int, extra: bytes = b"") -> socket.socket:
    """A bare socket through the handshake, for sending what websocket-client would not."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sock.sendall(
        b"GET /raw HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n" + extra
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 ")
    assert f"Sec-WebSocket-Accept: {accept_key(key)}".encode() in head
    return sock


def read_events(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    parser = FrameParser(expect_masked=False)
    events: list[tuple[int, bytes]] = []
    while len(events) < count:
        data = sock.recv(65536)
        assert data, f"closed after {events}"
        events += parser.feed(data)
    return events


def http_get(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return response


# --------------------------------------------------------------------------------------


def test_accept_key_matches_rfc_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_text_and_binary_are_echoed_unchanged(echo):
    ws = connect(echo.url_for("/"))
    try:
        ws.send("héllo")
        assert ws.recv_data() == (OP_TEXT, "héllo".encode())
        ws.send_binary(b"\x00\xff\x01")
        assert ws.recv_data() == (OP_BINARY, b"\x00\xff\x01")
        ws.send_binary(b"")
        assert ws.recv_data() == (OP_BINARY, b"")
    finally:
        ws.close()


def test_one_mebibyte_binary_is_echoed(echo):
    payload = bytes(range(256)) * 4096
    ws = connect(echo.url)
    try:
        ws.send_binary(payload)
        assert ws.recv_data() == (OP_BINARY, payload)
    finally:
        ws.close()


def test_many_pipelined_messages_come_back_in_order(echo):
    ws = connect(echo.url)
    try:
        for i in range(500):
            ws.send(str(i))
        assert [ws.recv() for _ in range(500)] == [str(i) for i in range(500)]
    finally:
        ws.close()


def test_ping_is_answered_with_pong_in_order_with_data(echo):
    ws = connect(echo.url)
    try:
        ws.send("before")
        ws.ping(b"ping payload")
        ws.send("after")
        frames = [ws.recv_data_frame(control_frame=True) for _ in range(3)]
        assert [(f.opcode, f.data) for _, f in frames] == [
            (OP_TEXT, b"before"),
            (websocket.ABNF.OPCODE_PONG, b"ping payload"),
            (OP_TEXT, b"after"),
        ]
    finally:
        ws.close()


def test_fragmented_message_is_echoed_whole_with_interleaved_ping(echo):
    sock = raw_upgrade(echo.port)
    with sock:
        source = MaskSource()
        sock.sendall(
            encode_frame(OP_TEXT, b"frag", fin=False, mask_source=source)
            + encode_frame(0x9, b"p", mask_source=source)
            + encode_frame(0x0, b"mented", mask_source=source)
        )
        assert read_events(sock, 2) == [(0xA, b"p"), (OP_TEXT, b"fragmented")]


@pytest.mark.parametrize("code", [1000, 1001, 3001, 4999])
def test_close_handshake_echoes_the_code(echo, code):
    ws = connect(echo.url)
    ws.send_close(status=code, reason=b"bye")
    assert close_code(ws.recv_frame()) == code
    ws.shutdown()


def test_close_without_code_is_answered_with_1000(echo):
    ws = connect(echo.url)
    ws.send(b"", opcode=websocket.ABNF.OPCODE_CLOSE)
    assert close_code(ws.recv_frame()) == 1000
    ws.shutdown()


def test_close_with_invalid_code_is_answered_with_1002(echo):
    ws = connect(echo.url)
    ws.send(struct.pack("!H", 1005), opcode=websocket.ABNF.OPCODE_CLOSE)
    assert close_code(ws.recv_frame()) == 1002
    ws.shutdown()


def test_server_closes_the_socket_after_the_close_reply(echo):
    ws = connect(echo.url)
    ws.send_close(status=1000)
    assert close_code(ws.recv_frame()) == 1000
    ws.sock.shutdown(socket.SHUT_WR)  # the client's side of the TCP close
    assert ws.sock.recv(10) == b""
    ws.shutdown()


def test_unmasked_client_frame_gets_close_1002(echo):
    sock = raw_upgrade(echo.port)
    with sock:
        sock.sendall(encode_frame(OP_TEXT, b"unmasked"))
        assert read_events(sock, 1) == [(OP_CLOSE, struct.pack("!H", 1002))]


def test_invalid_utf8_text_gets_close_1007(echo):
    sock = raw_upgrade(echo.port)
    with sock:
        sock.sendall(encode_frame(OP_TEXT, b"ok" + b"\xff", mask_source=MaskSource()))
        assert read_events(sock, 1) == [(OP_CLOSE, struct.pack("!H", 1007))]


def test_frames_sent_with_the_handshake_are_not_lost(echo):
    frame = encode_frame(OP_BINARY, b"early", mask_source=MaskSource())
    sock = raw_upgrade(echo.port, extra=frame)
    with sock:
        assert read_events(sock, 1) == [(OP_BINARY, b"early")]


def test_subprotocol_choice(start_echo):
    echo = start_echo("--subprotocol", "chat", "--subprotocol", "superchat")
    ws = connect(echo.url, subprotocols=["superchat", "chat"])
    assert ws.getsubprotocol() == "superchat"  # the client's first choice that the server has
    ws.close()
    ws = connect(echo.url, subprotocols=["other", "chat"])
    assert ws.getsubprotocol() == "chat"
    ws.close()
    ws = connect(echo.url)  # none offered: none chosen
    assert ws.getsubprotocol() is None
    ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect(echo.url, subprotocols=["other"])
    assert info.value.status_code == 400


def test_without_subprotocol_option_none_is_answered(echo):
    response = http_get(
        echo.port,
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n\r\n" + encode_frame(OP_CLOSE, b"", mask_source=MaskSource()),
    )
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-protocol" not in response.lower()


@pytest.mark.parametrize("status", [403, 503])
def test_reject_status(start_echo, status):
    echo = start_echo("--reject-status", str(status))
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect(echo.url_for("/ws?x=1"), header=["X-Client-Id: c1"])
    assert info.value.status_code == status
    stats = echo.stats()
    assert stats["connections_total"] == 0
    assert stats["last_headers"]["x-client-id"] == "c1"  # seen even when refused
    assert stats["last_path"] == "/ws?x=1"


def test_stream_mode_sends_numbers_in_order_and_still_echoes(start_echo):
    echo = start_echo("--stream-interval-ms", "20")
    ws = connect(echo.url)
    try:
        assert [ws.recv() for _ in range(3)] == ["1", "2", "3"]
        ws.send("echo me")
        received = [ws.recv() for _ in range(4)]  # the echo, among further ticks
        assert "echo me" in received
        ticks = [int(m) for m in received if m != "echo me"]
        assert ticks == list(range(4, 4 + len(ticks)))
    finally:
        ws.close()
    ws = connect(echo.url)  # the count is per connection
    try:
        assert ws.recv() == "1"
    finally:
        ws.close()


def test_stats_counts_connections_and_shows_the_last_upgrade(start_echo):
    echo = start_echo()
    assert echo.stats() == {
        "name": "echo",
        "connections_total": 0,
        "connections_open": 0,
        "messages_total": 0,
        "pings_total": 0,
        "last_headers": {},
        "last_path": "",
    }
    first = connect(echo.url_for("/a"))
    second = connect(
        echo.url_for("/pipe?client=42&x=y"),
        header=["X-Client-Id: abc-123", "X-Reconnect-Count: 3", "Authorization: Bearer t0k"],
        cookie="session=s1",
    )
    stats = echo.stats()
    assert stats["connections_total"] == 2
    assert stats["connections_open"] == 2
    assert stats["last_path"] == "/pipe?client=42&x=y"
    headers = stats["last_headers"]
    assert headers["x-client-id"] == "abc-123"
    assert headers["x-reconnect-count"] == "3"
    assert headers["authorization"] == "Bearer t0k"
    assert headers["cookie"] == "session=s1"
    assert headers["upgrade"] == "websocket"
    first.ping(b"p")
    opcode, frame = first.recv_data_frame(True)  # the pong: the ping has been counted
    assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"p")
    assert echo.stats()["pings_total"] == 1
    second.close()  # returns once the server's CLOSE came back: the count is already lowered
    stats = echo.stats()
    assert (stats["connections_total"], stats["connections_open"]) == (2, 1)
    first.close()
    assert echo.stats()["connections_open"] == 0


def test_stats_name(start_echo):
    assert start_echo(name="backend-b").stats()["name"] == "backend-b"


def test_plain_get_elsewhere_is_426_and_bad_requests_do_not_kill_the_server(echo):
    assert http_get(echo.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 426 ")
    assert http_get(echo.port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert http_get(echo.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    bad_key = (
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert http_get(echo.port, bad_key).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", echo.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")  # hang up in the middle of the handshake
    ws = connect(echo.url)
    ws.send("still alive")
    assert ws.recv() == "still alive"
    ws.close()


def test_kill_makes_the_next_recv_fail(start_echo):
    echo = start_echo()
    ws = connect(echo.url)
    ws.send("x")
    assert ws.recv() == "x"
    echo.kill()
    assert echo.proc.returncode == -9
    with pytest.raises((websocket.WebSocketException, OSError)):
        ws.recv()
    ws.shutdown()


def test_terminate_sends_going_away_and_exits_cleanly(start_echo):
    echo = start_echo()
    ws = connect(echo.url)
    ws.send("x")
    assert ws.recv() == "x"
    echo.proc.terminate()
    assert close_code(ws.recv_frame()) == 1001
    ws.shutdown()
    echo.terminate()
    assert echo.proc.returncode == 0


def test_terminate_is_idempotent_and_context_manager_cleans_up():
    with EchoProcess(name="ctx") as echo:
        assert echo.url == f"ws://127.0.0.1:{echo.port}"
        assert echo.url_for("x") == f"ws://127.0.0.1:{echo.port}/x"
        assert echo.stats()["name"] == "ctx"
    assert echo.proc.returncode == 0
    echo.terminate()
    echo.kill()


def test_start_raises_with_stderr_when_the_child_dies():
    with pytest.raises(RuntimeError, match="unrecognized arguments"):
        EchoProcess("--no-such-option").start()


def test_start_times_out_when_no_line_comes(monkeypatch):
    # A child that never prints: python -m iwsproxy.tools.echo replaced by a sleeping child.
    real_popen = subprocess.Popen

    def silent_popen(cmd, **kwargs):
        silent = "import time; time.sleep(30)"  # ok-sleep: the child's job is to stay silent until killed
        return real_popen([sys.executable, "-c", silent], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", silent_popen)
    echo = EchoProcess()
    with pytest.raises(RuntimeError, match="no LISTENING line"):
        echo.start(timeout=0.5)
    assert echo.proc.poll() is not None  # killed and reaped


def test_importing_echo_does_not_monkey_patch():
    code = "import iwsproxy.tools.echo\nfrom gevent import monkey\nprint(monkey.is_module_patched('socket'))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == "False"
