"""Large and finely fragmented messages with the default limits: every message up to the max message
size gets through a healthy backend, either way, in both delivery modes, with resume on or off; what
can never be carried is refused from its frame header."""

from __future__ import annotations

import threading
import uuid

import pytest
import websocket

from conftest import EchoProcess, Proxy, wait_for
from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, FrameParser, encode_frame
from rawws import FakeBackend, RawClient, frame

MiB = 1024 * 1024
MAX_MESSAGE = 16 * MiB  # the default --max-message-size
SIZES = [8 * MiB, 16 * MiB]
CONFIGS = {
    "at-least-once, resume on": (),
    "at-least-once, resume off": ("--resume-grace", "0"),
    "at-most-once, resume on": ("--delivery", "at-most-once"),
    "at-most-once, resume off": ("--delivery", "at-most-once", "--resume-grace", "0"),
}


def payload(size: int) -> bytes:
    """``size`` bytes of ASCII (valid as text and as binary) that differ along the message."""
    block = bytes(range(32, 127)) * 11  # 1045 bytes: not a divisor of a MiB, so offsets show
    return (block * (size // len(block) + 1))[:size]


class SpeakingBackend(FakeBackend):
    """A backend that sends large messages of its own: ``send text N`` / ``send binary N`` (a text
    message) makes it send N bytes of :func:`payload` as one message of that kind. It answers pings
    (the proxy's fences) and Close; any other message is echoed."""

    def _serve(self, conn):
        threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn):
        try:
            self._handshake(conn)
            parser = FrameParser(expect_masked=True, max_message_size=1 << 30)
            while data := conn.recv(256 * 1024):
                for opcode, body in parser.feed(data):
                    if opcode == OP_PING:
                        conn.sendall(encode_frame(OP_PONG, body))
                    elif opcode == OP_CLOSE:
                        conn.sendall(encode_frame(OP_CLOSE, body[:2]))
                        return
                    elif opcode == OP_TEXT and body.startswith(b"send "):
                        _, kind, size = body.split()
                        conn.sendall(encode_frame(OP_TEXT if kind == b"text" else OP_BINARY, payload(int(size))))
                    elif opcode in (OP_TEXT, OP_BINARY):
                        conn.sendall(encode_frame(opcode, body))
        except OSError:
            pass
        finally:
            conn.close()


def in_parallel(*calls) -> list:
    """Run the calls in threads (process starts and stops mostly wait); their results, in order."""
    results: list = [None] * len(calls)
    errors: list = []

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def large_backends():
    echo = EchoProcess(name="echo").start()
    speaker = SpeakingBackend()
    yield echo, speaker
    echo.terminate()
    speaker.close()


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def large_setup(request, large_backends):
    """Per delivery/resume setting, two proxies with default limits: one to an echo process, one to a
    :class:`SpeakingBackend`."""
    proxies = [Proxy("--backend", backend.url, *CONFIGS[request.param]) for backend in large_backends]
    try:
        yield in_parallel(*(proxy.start for proxy in proxies))
    finally:
        in_parallel(*(proxy.terminate for proxy in proxies))


def connect(proxy: Proxy) -> websocket.WebSocket:
    """A client that answers the proxy's pings (websocket-client does, while it reads); large text
    is checked by the proxy, not again here."""
    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(proxy.url_for(client_id), timeout=60, skip_utf8_validation=True)
    ws.client_id = client_id
    return ws


def assert_still_on_its_first_backend(proxy: Proxy, ws: websocket.WebSocket) -> None:
    """The session is still there, on the backend it started with: a small message goes round."""
    ws.send("still here")
    assert ws.recv_data() == (OP_TEXT, b"still here")
    (pipe,) = [p for p in proxy.pipes() if ws.client_id.startswith(p["client"])]
    assert (pipe["state"], pipe["failovers"]) == ("connected", 0)


def test_messages_up_to_the_max_size_are_echoed_through_a_healthy_backend(large_setup):
    proxy, _ = large_setup
    ws = connect(proxy)
    try:
        for size in SIZES:
            data = payload(size)
            ws.send_binary(data)
            assert ws.recv_data() == (OP_BINARY, data)
            ws.send(data.decode())
            assert ws.recv_data() == (OP_TEXT, data)
        assert_still_on_its_first_backend(proxy, ws)
    finally:
        ws.close()


def test_messages_up_to_the_max_size_from_the_backend_reach_the_client(large_setup):
    _, proxy = large_setup
    ws = connect(proxy)
    try:
        for size in SIZES:
            for kind, opcode in (("binary", OP_BINARY), ("text", OP_TEXT)):
                ws.send(f"send {kind} {size}")
                assert ws.recv_data() == (opcode, payload(size))
        assert_still_on_its_first_backend(proxy, ws)
    finally:
        ws.close()


# ---- fragments and limits, with every default ----

@pytest.fixture(scope="module")
def default_proxy():
    echo = EchoProcess(name="echo").start()
    proxy = Proxy("--backend", echo.url).start()
    yield proxy, echo
    proxy.terminate()
    echo.terminate()


def upgraded(proxy: Proxy) -> RawClient:
    client = RawClient(proxy.port, timeout=30)
    assert client.handshake() == 101
    return client


def close_frame(client: RawClient) -> tuple[int, str]:
    """Read until the proxy's Close (skipping data and pings): its code and reason."""
    while events := client.events():
        for opcode, body in events:
            if opcode == OP_CLOSE:
                return int.from_bytes(body[:2], "big"), body[2:].decode()
    raise AssertionError("the connection ended without a Close")


def test_4_mib_in_65536_fragments_of_64_bytes_is_echoed_whole(default_proxy):
    proxy, _ = default_proxy
    data = payload(4 * MiB)
    pieces = [data[i:i + 64] for i in range(0, len(data), 64)]
    assert len(pieces) == 65536
    client = upgraded(proxy)
    try:
        client.send(b"".join(frame(OP_CONT if i else OP_TEXT, piece, fin=i == len(pieces) - 1)
                             for i, piece in enumerate(pieces)))
        assert client.data_events() == [(OP_TEXT, data)]
    finally:
        client.close()


def test_a_flood_of_empty_continuation_frames_is_closed_with_1008(default_proxy):
    proxy, echo = default_proxy
    before = echo.stats()["messages_total"]
    client = upgraded(proxy)
    try:
        client.send(frame(OP_TEXT, b"a", fin=False) + frame(OP_CONT, b"", fin=False) * 2000)
        assert close_frame(client) == (1008, "1025 fragments for 1 bytes: more than 1024 + 1 per 32 bytes")
    finally:
        client.close()
    assert echo.stats()["messages_total"] == before


@pytest.mark.parametrize("start, header, reason", [
    (b"", frame(OP_BINARY, b"", length=MAX_MESSAGE + 1)[:14],
     f"frame of {MAX_MESSAGE + 1} bytes over the max message size of {MAX_MESSAGE} bytes"),
    (frame(OP_TEXT, b"x" * 1024, fin=False), frame(OP_CONT, b"", length=MAX_MESSAGE - 1023)[:14],
     f"fragmented message over the max message size of {MAX_MESSAGE} bytes"),
], ids=["one frame", "fragments"])
def test_a_message_over_the_max_size_is_closed_with_1009_before_its_payload_is_sent(
        default_proxy, start, header, reason):
    proxy, _ = default_proxy
    client = upgraded(proxy)
    try:
        client.send(start + header)  # a header (with its mask key) and not one byte of the payload
        assert close_frame(client) == (1009, reason)
    finally:
        client.close()


def test_invalid_utf8_in_the_first_fragment_is_closed_with_1007_before_the_rest_is_sent(default_proxy):
    proxy, echo = default_proxy
    before = echo.stats()["messages_total"]
    client = upgraded(proxy)
    try:
        client.send(frame(OP_TEXT, b"caf\xc3\xa9 \xff" + b"x" * 1000, fin=False))
        assert close_frame(client) == (1007, "text message is not valid UTF-8")  # the rest was never sent
        try:
            client.send(frame(OP_CONT, b"y" * 1000, fin=True))  # too late: the proxy has closed
        except OSError:
            pass
        assert client.at_eof()
    finally:
        client.close()
    assert echo.stats()["messages_total"] == before
    wait_for(lambda: not [p for p in proxy.pipes() if client.path[1:].startswith(p["client"])],
             what="the session to end")
