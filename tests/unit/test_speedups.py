"""The compiled hot path (iwsproxy._speedups) against the pure-Python code it stands in for.

Every test here runs the same input through both paths of the codec and the buffers and
asks for the same result: the same events, control frames, errors (type, close code,
reason, the events before them), bytes on the wire and byte counts.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iwsproxy import buffer, frames
from iwsproxy.accel import speedups
from iwsproxy.exceptions import ProtocolError
from iwsproxy.frames import OP_BINARY, OP_TEXT, FrameParser, MaskSource

needs_c = pytest.mark.skipif(speedups is None, reason="iwsproxy._speedups is not built")


class FixedKeys(MaskSource):
    """Mask keys from a fixed byte string, so that two encodings of one batch can be compared."""

    def __init__(self, seed: bytes):
        super().__init__()
        self._seed = seed or b"\x00"

    def keys(self, count: int) -> bytes:
        n = 4 * count
        return (self._seed * (n // len(self._seed) + 1))[:n]


# ---- frames, good and bad ----

_OPCODES = st.sampled_from([0x0, 0x1, 0x2, 0x1, 0x2, 0x1, 0x2, 0x8, 0x9, 0xA, 0x9, 0xA, 0x3, 0xB])
_TEXTS = st.text(max_size=40).map(lambda t: t.encode("utf-8"))
# byte strings near valid UTF-8: valid text with a byte or two changed or cut
_NEAR_TEXT = st.tuples(_TEXTS, st.integers(0, 50), st.integers(0, 255)).map(
    lambda t: (t[0][: t[1]] + bytes([t[2]]) + t[0][t[1]:]) if t[0] else bytes([t[2]]))
_PAYLOADS = st.one_of(_TEXTS, _NEAR_TEXT, st.binary(max_size=60),
                      st.integers(100, 70000).map(lambda n: b"\xe2\x82\xac" * (n // 3)),
                      st.integers(120, 300).map(lambda n: bytes(range(256)) * (n // 256) + b"a" * (n % 256)))


@st.composite
def raw_frame(draw, masked: bool) -> bytes:
    """One frame, mostly well formed; sometimes a bit or a length out of line."""
    opcode = draw(_OPCODES)
    payload = draw(_PAYLOADS)
    fin = draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else True
    rsv = draw(st.sampled_from([0x40, 0x20, 0x10])) if draw(st.integers(0, 30)) == 0 else 0
    mask = (not masked) if draw(st.integers(0, 30)) == 0 else masked
    n = len(payload)
    form = draw(st.sampled_from(["min", "min", "min", "16", "64"]))
    b0 = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if mask else 0
    if form == "64" or n >= 0x10000:
        head = struct.pack("!BBQ", b0, mask_bit | 127, n)
    elif form == "16" or n >= 126:
        head = struct.pack("!BBH", b0, mask_bit | 126, n)
    else:
        head = struct.pack("!BB", b0, mask_bit | n)
    if not mask:
        return head + payload
    key = draw(st.binary(min_size=4, max_size=4))
    return head + key + frames.python_apply_mask(payload, key)


@st.composite
def stream(draw):
    """A parser's settings and a byte stream cut into chunks."""
    masked = draw(st.booleans())
    data = b"".join(draw(st.lists(raw_frame(masked), max_size=12)))
    if draw(st.booleans()):
        data += draw(st.binary(max_size=8))  # a torn frame, or junk, at the end
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    as_bytearray = draw(st.booleans())
    options = dict(expect_masked=masked, split_controls=draw(st.booleans()),
                   max_message_size=draw(st.sampled_from([0, 10, 125, 126, 200, 65535, 100000, 64 * 1024 * 1024])),
                   max_fragments=draw(st.sampled_from([1, 2, 1024])))
    return options, [bytearray(c) if as_bytearray else c for c in chunks]


def run_parser(options: dict, chunks: list) -> list:
    """Everything a parser says about ``chunks``, feed by feed, in comparable form."""
    parser = FrameParser(**options)
    said = []
    for chunk in chunks:
        try:
            events = parser.feed(chunk)
        except ProtocolError as exc:
            said.append(("error", type(exc).__name__, exc.close_code, exc.reason, exc.events,
                         list(parser.controls)))
            continue
        said.append(("events", events, list(parser.controls), [type(p) for _, p in events]))
    return said


@needs_c
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream())
def test_parser_in_c_says_what_the_python_parser_says(case):
    options, chunks = case
    with_c = run_parser(options, chunks)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(frames, "_scan_frames", None)
        in_python = run_parser(options, chunks)
    assert with_c == in_python


@needs_c
@settings(max_examples=1500, deadline=None)
@given(st.one_of(_NEAR_TEXT, _TEXTS, st.binary(max_size=20)), st.booleans())
def test_utf8_check_in_c_is_pythons(payload, masked):
    key = b"\x01\x02\x03\x04"
    frame = frames.encode_frame(OP_TEXT, payload, mask_source=FixedKeys(key) if masked else None)
    events: list = []
    pos = speedups.scan_frames(frame, 0, 0x80 if masked else 0, 0xFFFF, events, None)
    try:
        payload.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert (pos == len(frame), events) == ((True, [(OP_TEXT, payload)]) if valid else (False, []))


_MESSAGES = st.lists(st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]),
                               st.one_of(st.binary(max_size=300), st.integers(65530, 70000).map(bytes),
                                         st.binary(max_size=20).map(bytearray))), max_size=20)


@needs_c
@settings(max_examples=300, deadline=None)
@given(_MESSAGES, st.one_of(st.none(), st.binary(max_size=125)), st.booleans(), st.binary(min_size=1, max_size=9))
def test_encoding_in_c_is_pythons(messages, ping, masked, seed):
    source = FixedKeys(seed) if masked else None
    assert frames.encode_messages(messages, source, ping) == frames.python_encode_messages(messages, source, ping)
    assert buffer.payload_bytes(messages) == buffer.python_payload_bytes(messages)


@needs_c
@pytest.mark.parametrize("masked", [False, True])
def test_encoding_refuses_what_python_refuses(masked):
    source = FixedKeys(b"k") if masked else None
    for messages, ping in [([(0x9, b"x")], None), ([(0x0, b"x")], None), ([(OP_TEXT, b"x")], b"p" * 126)]:
        with pytest.raises(ValueError):
            frames.python_encode_messages(messages, source, ping)
        with pytest.raises(ValueError):
            frames.encode_messages(messages, source, ping)


def test_pure_python_when_asked():
    """IWSPROXY_PURE_PYTHON=1 (or no compiled module) leaves the C path out, and the codec works."""
    code = ("import iwsproxy.accel as a, iwsproxy.frames as f, iwsproxy.buffer as b\n"
            "assert a.speedups is None and f._scan_frames is None and f._encode_data_frames is None\n"
            "assert b.payload_bytes is b.python_payload_bytes\n"
            "p = f.FrameParser(expect_masked=False)\n"
            "assert p.feed(f.encode_messages([(1, b'hi')], None, b'1')) == [(1, b'hi'), (9, b'1')]\n")
    env = dict(os.environ, IWSPROXY_PURE_PYTHON="1")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
