"""Fuzzing the client edge: after any random frame sequence the proxy still serves, leaks no pipe,
and closed the fuzzing client, if it did, with a proper close code and no error of its own."""

from __future__ import annotations

import uuid

import pytest
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EchoProcess, Proxy, wait_for
from iwsproxy.frames import OP_CLOSE
from rawws import RawClient, frame

frames = st.builds(
    lambda opcode, payload, fin, rsv, mask, lie: frame(opcode, payload, fin=fin, rsv=rsv, mask=mask,
                                                       length=max(0, len(payload) + lie) if lie else None),
    opcode=st.sampled_from([0, 1, 2, 8, 9, 10, 3, 11, 15]),
    payload=st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode),
                      st.binary(min_size=120, max_size=300)),
    fin=st.booleans(),
    rsv=st.sampled_from([0, 0, 0, 1, 4]),
    mask=st.sampled_from([True, True, True, False]),
    lie=st.sampled_from([0, 0, 0, 0, -1, 1, 70000]),
)

NO_STATUS = 1005  # a Close frame with an empty payload (the echo of one)


def may_close_with(code: int) -> bool:
    """A code the proxy may send this client: its own refusals (1002 protocol, 1007 invalid data,
    1009 too big) or the echo of a Close the client sent (or that its bytes parse as), which
    carries any code a peer may send (RFC 6455 7.4), or none. Never a code reserved off the wire."""
    return code == NO_STATUS or 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


@pytest.fixture(scope="module")
def fuzz_proxy():
    backend = EchoProcess(name="echo").start()
    proxy = Proxy("--backend", backend.url, "--max-message-size", "64KiB", "--max-fragments", "16",
                  "--resume-grace", "0", "--log-level", "error").start()
    yield proxy
    assert proxy.running
    proxy.terminate()
    backend.terminate()


def fuzz(port: int, data: bytes, cut: int, close: bool) -> tuple[list[bytes], bool]:
    """Send ``data`` in pieces of ``cut`` bytes (then a Close if ``close``); return the payloads of
    the Close frames the proxy sent and whether it ended the connection within 0.5 s of the last."""
    client = RawClient(port, timeout=5)
    try:
        assert client.handshake() == 101
        try:
            for start in range(0, len(data), cut):
                client.send(data[start:start + cut])
            if close:
                client.send(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        except OSError:
            pass  # the proxy closed first; a reset fails the send, its Close is still read below
        closes = []
        client.sock.settimeout(0.5)
        try:
            while events := client.events():
                closes += [payload for opcode, payload in events if opcode == OP_CLOSE]
        except TimeoutError:
            return closes, False  # a frame still incomplete: the proxy waits for more bytes
        except OSError:
            pass  # reset after the proxy's Close
        return closes, True
    finally:
        client.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(sequence=st.lists(frames, max_size=8), cut=st.integers(min_value=1, max_value=64), close=st.booleans())
def test_random_frame_sequences(fuzz_proxy, sequence, cut, close):
    closes, ended = fuzz(fuzz_proxy.port, b"".join(sequence), cut, close)
    if ended:  # the proxy never drops a client without a Close frame
        assert closes, "the connection ended without a Close frame"
    if closes:
        code = int.from_bytes(closes[0][:2], "big") if len(closes[0]) >= 2 else NO_STATUS
        assert may_close_with(code), f"closed with {code}"
    errors = [line for line in fuzz_proxy.stderr_text().splitlines() if "Traceback" in line or " ERROR " in line]
    assert not errors, "\n".join(errors)
    # a fresh client is served end to end, and every pipe, the fuzzed one and its own, ends
    fresh = websocket.create_connection(fuzz_proxy.url_for(str(uuid.uuid4())), timeout=5)
    fresh.send("still serving")
    assert fresh.recv() == "still serving"
    fresh.close()
    wait_for(lambda: fuzz_proxy.pipes() == [], what="every pipe to end")
