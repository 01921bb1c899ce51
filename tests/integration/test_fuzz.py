"""Fuzzing the client edge: random frame sequences never crash the proxy or leak a pipe."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EchoProcess, Proxy, wait_for
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


@pytest.fixture(scope="module")
def fuzz_proxy():
    backend = EchoProcess(name="echo").start()
    proxy = Proxy("--backend", backend.url, "--max-message-size", "64KiB", "--max-fragments", "16",
                  "--resume-grace", "0", "--log-level", "error").start()
    yield proxy
    wait_for(lambda: proxy.pipes() == [], what="every fuzzed pipe to end")
    assert proxy.running
    proxy.terminate()
    backend.terminate()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(sequence=st.lists(frames, max_size=8), cut=st.integers(min_value=1, max_value=64), close=st.booleans())
def test_random_frame_sequences(fuzz_proxy, sequence, cut, close):
    client = RawClient(fuzz_proxy.port, timeout=5)
    assert client.handshake() == 101
    data = b"".join(sequence)
    try:
        for start in range(0, len(data), cut):
            client.send(data[start:start + cut])
        if close:
            client.send(frame(8, (1000).to_bytes(2, "big")))
        # the proxy answers, closes, or (a frame still incomplete) waits for more bytes: all fine
        client.sock.settimeout(0.5)
        while client.events():
            pass
    except (ConnectionError, socket.timeout, OSError):
        pass
    finally:
        client.close()
    with urllib.request.urlopen(fuzz_proxy.http_url + "/healthz", timeout=5) as health:
        assert health.status == 200
