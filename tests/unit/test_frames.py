"""Unit tests of iwsproxy.frames: the RFC 6455 codec, checked rule by rule and against a
deliberately simple reference implementation written below."""

from __future__ import annotations

import codecs
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from iwsproxy.exceptions import MessageTooBig, ProtocolError
from iwsproxy.frames import (
    BYTES_PER_EXTRA_FRAGMENT,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    MaskSource,
    apply_mask,
    encode_close_payload,
    encode_frame,
    encode_messages,
    parse_close_payload,
)

# --------------------------------------------------------------------------------------
# The reference: straightforward, byte by byte, no cleverness.
# --------------------------------------------------------------------------------------


def ref_mask(data: bytes, key: bytes) -> bytes:
    out = bytearray()
    for i, byte in enumerate(data):
        out.append(byte ^ key[i % 4])
    return bytes(out)


def ref_encode(opcode: int, payload: bytes, key: bytes | None, fin: bool = True, rsv: int = 0) -> bytes:
    out = bytearray()
    out.append((0x80 if fin else 0) | (rsv << 4) | opcode)
    mask_bit = 0x80 if key is not None else 0
    n = len(payload)
    if n <= 125:
        out.append(mask_bit | n)
    elif n <= 65535:
        out.append(mask_bit | 126)
        out += n.to_bytes(2, "big")
    else:
        out.append(mask_bit | 127)
        out += n.to_bytes(8, "big")
    if key is not None:
        out += key
        out += ref_mask(payload, key)
    else:
        out += payload
    return bytes(out)


def ref_parse(
    stream: bytes, *, expect_masked: bool, max_message_size: int, max_fragments: int
) -> tuple[list[tuple[int, bytes]], int | None]:
    """Parse a whole stream; return (events, close code of the first violation or None)."""
    events: list[tuple[int, bytes]] = []
    pos = 0
    message_opcode = None
    parts: list[bytes] = []
    while pos + 2 <= len(stream):
        first, second = stream[pos], stream[pos + 1]
        fin = bool(first & 0x80)
        rsv = (first >> 4) & 0x7
        opcode = first & 0xF
        masked = bool(second & 0x80)
        length = second & 0x7F
        is_control = opcode in (OP_CLOSE, OP_PING, OP_PONG)
        if rsv:
            return events, 1002
        if opcode not in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
            return events, 1002
        if is_control and (not fin or length > 125):
            return events, 1002
        if masked != expect_masked:
            return events, 1002
        if opcode == OP_CONT:
            if message_opcode is None:
                return events, 1002
        elif not is_control and message_opcode is not None:
            return events, 1002
        pos += 2
        if length == 126:
            length = int.from_bytes(stream[pos : pos + 2], "big")
            pos += 2
        elif length == 127:
            length = int.from_bytes(stream[pos : pos + 8], "big")
            if length >= 2**63:
                return events, 1002
            pos += 8
        if not is_control:
            so_far = sum(len(p) for p in parts) if opcode == OP_CONT else 0
            if so_far + length > max_message_size:
                return events, 1009
            # past max_fragments frames, one more per BYTES_PER_EXTRA_FRAGMENT bytes of the message
            frames = len(parts) + 1 if opcode == OP_CONT else 1
            if frames > max_fragments + (so_far + length) // BYTES_PER_EXTRA_FRAGMENT:
                return events, 1008
        key = None
        if masked:
            key = stream[pos : pos + 4]
            pos += 4
        payload = stream[pos : pos + length]
        if len(payload) < length:
            break  # incomplete last frame
        pos += length
        if key is not None:
            payload = ref_mask(payload, key)
        if is_control:
            events.append((opcode, payload))
            continue
        if opcode != OP_CONT:
            message_opcode = opcode
            parts = []
        parts.append(payload)
        if message_opcode == OP_TEXT and not fin:
            try:  # the text so far must be valid UTF-8 up to a character cut at its end
                codecs.utf_8_decode(b"".join(parts), "strict", False)
            except UnicodeDecodeError:
                return events, 1007
        if fin:
            message = b"".join(parts)
            if message_opcode == OP_TEXT:
                try:
                    message.decode("utf-8")
                except UnicodeDecodeError:
                    return events, 1007
            events.append((message_opcode, message))
            message_opcode = None
            parts = []
    return events, None


class FixedMask(MaskSource):
    """A MaskSource that hands out the given keys, so output can be compared byte for byte."""

    def __init__(self, *keys: bytes):
        super().__init__()
        self._keys = list(keys)

    def keys(self, count: int) -> bytes:
        taken, self._keys = self._keys[:count], self._keys[count:]
        return b"".join(taken)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, key: bytes = b"\x12\x34\x56\x78") -> bytes:
    return ref_encode(opcode, payload, key, fin)


def feed_in_chunks(parser: FrameParser, stream: bytes, sizes) -> list[tuple[int, bytes]]:
    events: list[tuple[int, bytes]] = []
    pos = 0
    for size in sizes:
        if pos >= len(stream):
            break
        events += parser.feed(stream[pos : pos + size])
        pos += size
    if pos < len(stream):
        events += parser.feed(stream[pos:])
    return events


def raises_code(parser: FrameParser, data: bytes, code: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parser.feed(data)
    assert info.value.close_code == code
    return info.value


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


SIZES = [0, 1, 125, 126, 127, 65535, 65536, 1024 * 1024]


# --------------------------------------------------------------------------------------
# apply_mask, MaskSource
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 7, 8, 100, 1001])
def test_apply_mask_matches_reference(size):
    data = random_bytes(size, size)
    key = b"\x00\xff\x81\x7e"
    assert apply_mask(data, key) == ref_mask(data, key)
    assert apply_mask(bytearray(data), key) == ref_mask(data, key)
    assert apply_mask(memoryview(data), key) == ref_mask(data, key)


def test_apply_mask_keeps_leading_zero_bytes_and_is_its_own_inverse():
    data = b"\x00\x00\x00\x01\x00"
    key = b"\x00\x00\x00\x00"
    assert apply_mask(data, key) == data
    key = b"\x01\x02\x03\x04"
    assert apply_mask(apply_mask(data, key), key) == data
    assert apply_mask(b"\x01\x02", b"\x01\x02\xff\xff") == b"\x00\x00"


def test_apply_mask_empty():
    assert apply_mask(b"", b"abcd") == b""
    assert type(apply_mask(bytearray(), b"abcd")) is bytes


def test_mask_source_gives_4_byte_keys_that_vary_across_pool_refills():
    source = MaskSource()
    keys = [source.next_key() for _ in range(3000)]  # crosses two refills of the 4096-byte pool
    assert all(type(k) is bytes and len(k) == 4 for k in keys)
    assert len(set(keys)) > 2900  # 32-bit random keys: collisions are rare


def test_mask_source_gives_a_batch_its_keys_at_once_even_past_the_pool_size():
    source = MaskSource()
    batches = [source.keys(count) for count in (1, 1000, 3000, 7)]  # 3000 keys: more than one pool holds
    assert [len(b) for b in batches] == [4, 4000, 12000, 28]
    keys = [b[i : i + 4] for b in batches for i in range(0, len(b), 4)]
    assert len(set(keys)) > len(keys) - 10


# --------------------------------------------------------------------------------------
# encode_frame
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("masked", [False, True])
def test_encode_frame_matches_reference(size, masked):
    payload = random_bytes(size, size)
    key = b"\xa1\xb2\xc3\xd4"
    source = FixedMask(key) if masked else None
    frame = encode_frame(OP_BINARY, payload, mask_source=source)
    assert type(frame) is bytes
    if size <= 65536:  # the byte-by-byte reference is slow on 1 MiB
        assert frame == ref_encode(OP_BINARY, payload, key if masked else None)
    else:
        assert frame[:2] == bytes([0x82, (0x80 if masked else 0) | 127])
        assert frame[2:10] == struct.pack("!Q", size)
        body = frame[14:] if masked else frame[10:]
        assert (apply_mask(body, key) if masked else body) == payload
        if masked:
            assert frame[10:14] == key


def test_encode_frame_header_lengths():
    assert encode_frame(OP_TEXT, b"a" * 125)[:2] == b"\x81\x7d"
    assert encode_frame(OP_TEXT, b"a" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert encode_frame(OP_TEXT, b"a" * 65535)[:4] == b"\x81\x7e\xff\xff"
    assert encode_frame(OP_TEXT, b"a" * 65536)[:10] == b"\x81\x7f" + struct.pack("!Q", 65536)


def test_encode_frame_not_fin_and_continuation():
    assert encode_frame(OP_TEXT, b"ab", fin=False) == b"\x01\x02ab"
    assert encode_frame(OP_CONT, b"c") == b"\x80\x01c"


def test_encode_frame_accepts_bytearray_and_memoryview():
    assert encode_frame(OP_BINARY, bytearray(b"ab")) == b"\x82\x02ab"
    assert encode_frame(OP_BINARY, memoryview(b"ab")) == b"\x82\x02ab"


@pytest.mark.parametrize(
    "opcode, payload, fin",
    [(3, b"", True), (0xB, b"", True), (OP_PING, b"x" * 126, True), (OP_CLOSE, b"", False)],
)
def test_encode_frame_refuses_what_no_peer_may_send(opcode, payload, fin):
    with pytest.raises(ValueError):
        encode_frame(opcode, payload, fin=fin)


def test_encode_frame_with_mask_source_is_masked_with_fresh_keys():
    source = MaskSource()
    a = encode_frame(OP_BINARY, b"same payload", mask_source=source)
    b = encode_frame(OP_BINARY, b"same payload", mask_source=source)
    assert a[1] & 0x80 and b[1] & 0x80
    assert a[2:6] != b[2:6]
    assert apply_mask(a[6:], a[2:6]) == b"same payload"


# --------------------------------------------------------------------------------------
# Close payloads
# --------------------------------------------------------------------------------------


def test_encode_close_payload():
    assert encode_close_payload(None) == b""
    assert encode_close_payload(None, "ignored") == b""
    assert encode_close_payload(1000) == b"\x03\xe8"
    assert encode_close_payload(1013, "try again") == b"\x03\xf5try again"


def test_encode_close_payload_truncates_reason_at_a_character_boundary():
    payload = encode_close_payload(1000, "a" + "é" * 100)  # 1 + 200 bytes of UTF-8
    assert len(payload) == 2 + 123
    assert parse_close_payload(payload) == (1000, "a" + "é" * 61)
    payload = encode_close_payload(1000, "é" * 100)  # 123 would split the 62nd "é"
    assert len(payload) == 2 + 122
    assert parse_close_payload(payload) == (1000, "é" * 61)
    payload = encode_close_payload(4000, "x" * 123)
    assert len(payload) == 125
    assert len(encode_frame(OP_CLOSE, encode_close_payload(1000, "€" * 500))) <= 127


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_encode_close_payload_refuses_unsendable_codes(code):
    with pytest.raises(ValueError):
        encode_close_payload(code)


def test_parse_close_payload_valid():
    assert parse_close_payload(b"") == (None, "")
    assert parse_close_payload(b"\x03\xe8") == (1000, "")
    assert parse_close_payload(b"\x0f\xa0bye \xc3\xa9") == (4000, "bye é")
    assert parse_close_payload(bytearray(b"\x03\xe9x")) == (1001, "x")


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999])
def test_parse_close_payload_accepts_valid_codes(code):
    assert parse_close_payload(struct.pack("!H", code)) == (code, "")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_parse_close_payload_rejects_invalid_codes_with_1002(code):
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(struct.pack("!H", code) + b"reason")
    assert info.value.close_code == 1002


def test_parse_close_payload_rejects_one_byte_with_1002():
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(b"\x03")
    assert info.value.close_code == 1002


def test_parse_close_payload_rejects_invalid_utf8_reason_with_1007():
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(b"\x03\xe8\xff\xfe")
    assert info.value.close_code == 1007


# --------------------------------------------------------------------------------------
# FrameParser: valid input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_roundtrip_sizes_client_role(size, opcode):
    payload = b"a" * size if opcode == OP_TEXT else random_bytes(size, size)
    frame = encode_frame(opcode, payload, mask_source=MaskSource())
    events = FrameParser(expect_masked=True).feed(frame)
    assert events == [(opcode, payload)]
    assert type(events[0][1]) is bytes


@pytest.mark.parametrize("size", SIZES)
def test_roundtrip_sizes_backend_role(size):
    payload = random_bytes(size, size)
    events = FrameParser(expect_masked=False).feed(encode_frame(OP_BINARY, payload))
    assert events == [(OP_BINARY, payload)]


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65536])
def test_roundtrip_one_byte_at_a_time(size):
    payload = random_bytes(size, size)
    frames = encode_frame(OP_BINARY, payload, mask_source=MaskSource()) + encode_frame(
        OP_PING, b"p", mask_source=MaskSource()
    )
    parser = FrameParser(expect_masked=True)
    events = []
    for i in range(len(frames)):
        events += parser.feed(frames[i : i + 1])
    assert events == [(OP_BINARY, payload), (OP_PING, b"p")]


def test_roundtrip_many_frames_in_one_chunk_and_random_splits():
    rng = random.Random(7)
    source = MaskSource()
    expected = []
    stream = bytearray()
    for i in range(300):
        size = rng.choice([0, 1, 50, 125, 126, 1000, 65535, 65536])
        opcode = rng.choice([OP_TEXT, OP_BINARY, OP_PING, OP_PONG])
        if opcode in (OP_PING, OP_PONG):
            size = min(size, 125)
        payload = ("é" * size).encode()[:size] if opcode == OP_TEXT else random_bytes(size, i)
        if opcode == OP_TEXT:
            payload = payload.decode("utf-8", "ignore").encode()
        expected.append((opcode, payload))
        stream += encode_frame(opcode, payload, mask_source=source)
    stream = bytes(stream)
    assert FrameParser(expect_masked=True).feed(stream) == expected
    for trial in range(5):
        sizes = (rng.randint(1, 70000) for _ in iter(int, 1))
        assert feed_in_chunks(FrameParser(expect_masked=True), stream, sizes) == expected


def test_feed_accepts_bytearray_and_memoryview_and_copies_out():
    frame = bytearray(encode_frame(OP_BINARY, b"hello", mask_source=MaskSource()))
    parser = FrameParser(expect_masked=True)
    events = parser.feed(memoryview(frame)[:3])
    events += parser.feed(memoryview(frame)[3:])
    assert events == [(OP_BINARY, b"hello")]
    server = FrameParser(expect_masked=False)
    chunk = bytearray(encode_frame(OP_BINARY, b"hello"))
    events = server.feed(chunk)
    chunk[2:] = b"XXXXX"  # the caller reuses its buffer: the event must not change
    assert events == [(OP_BINARY, b"hello")] and type(events[0][1]) is bytes


def test_empty_feed_and_partial_header():
    parser = FrameParser(expect_masked=True)
    assert parser.feed(b"") == []
    frame = encode_frame(OP_TEXT, b"x" * 70000, mask_source=MaskSource())
    assert parser.feed(frame[:1]) == []
    assert parser.feed(frame[1:5]) == []  # inside the 8-byte length
    assert parser.feed(frame[5:100]) == []
    assert parser.feed(b"") == []
    assert parser.feed(frame[100:]) == [(OP_TEXT, b"x" * 70000)]


def test_fragmented_message_is_reassembled_with_first_opcode():
    source = MaskSource()
    stream = (
        encode_frame(OP_TEXT, b"hel", fin=False, mask_source=source)
        + encode_frame(OP_CONT, b"", fin=False, mask_source=source)
        + encode_frame(OP_CONT, b"lo", mask_source=source)
        + encode_frame(OP_BINARY, b"\x00", fin=False, mask_source=source)
        + encode_frame(OP_CONT, b"\x01", mask_source=source)
    )
    assert FrameParser(expect_masked=True).feed(stream) == [(OP_TEXT, b"hello"), (OP_BINARY, b"\x00\x01")]


def test_control_frames_interleaved_between_fragments_come_out_first():
    source = MaskSource()
    stream = (
        encode_frame(OP_BINARY, b"a", fin=False, mask_source=source)
        + encode_frame(OP_PING, b"p1", mask_source=source)
        + encode_frame(OP_CONT, b"b", fin=False, mask_source=source)
        + encode_frame(OP_PONG, b"", mask_source=source)
        + encode_frame(OP_CLOSE, b"\x03\xe8", mask_source=source)
        + encode_frame(OP_CONT, b"c", mask_source=source)
    )
    expected = [(OP_PING, b"p1"), (OP_PONG, b""), (OP_CLOSE, b"\x03\xe8"), (OP_BINARY, b"abc")]
    assert FrameParser(expect_masked=True).feed(stream) == expected
    parser = FrameParser(expect_masked=True)
    assert [e for i in range(len(stream)) for e in parser.feed(stream[i : i + 1])] == expected


def test_text_split_inside_a_multibyte_character_is_valid():
    data = "é€😀".encode()
    source = MaskSource()
    stream = b"".join(
        encode_frame(OP_TEXT if i == 0 else OP_CONT, data[i : i + 1], fin=i == len(data) - 1, mask_source=source)
        for i in range(len(data))
    )
    assert FrameParser(expect_masked=True).feed(stream) == [(OP_TEXT, data)]


def test_close_payload_is_not_validated_by_feed():
    parser = FrameParser(expect_masked=True)
    frame = encode_frame(OP_CLOSE, b"\x00", mask_source=MaskSource())  # 1 byte: invalid as a close
    assert parser.feed(frame) == [(OP_CLOSE, b"\x00")]


def test_exact_size_limits_are_allowed():
    parser = FrameParser(expect_masked=True, max_message_size=10, max_fragments=3)
    source = MaskSource()
    stream = (
        encode_frame(OP_BINARY, b"x" * 10, mask_source=source)
        + encode_frame(OP_BINARY, b"abc", fin=False, mask_source=source)
        + encode_frame(OP_CONT, b"def", fin=False, mask_source=source)
        + encode_frame(OP_CONT, b"ghij", mask_source=source)
        + encode_frame(OP_PING, b"p" * 125, mask_source=source)  # control frames: only the 125 limit
    )
    assert parser.feed(stream) == [(OP_BINARY, b"x" * 10), (OP_BINARY, b"abcdefghij"), (OP_PING, b"p" * 125)]


# --------------------------------------------------------------------------------------
# FrameParser: violations, with exact close codes
# --------------------------------------------------------------------------------------


def test_client_frame_must_be_masked():
    raises_code(FrameParser(expect_masked=True), encode_frame(OP_TEXT, b"hi"), 1002)


def test_server_frame_must_not_be_masked():
    raises_code(FrameParser(expect_masked=False), encode_frame(OP_TEXT, b"hi", mask_source=MaskSource()), 1002)


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_rsv_bits_are_rejected(rsv):
    raises_code(FrameParser(expect_masked=True), ref_encode(OP_TEXT, b"hi", b"abcd", rsv=rsv), 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_rejected(opcode):
    raises_code(FrameParser(expect_masked=True), ref_encode(opcode, b"", b"abcd"), 1002)


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_control_frame_over_125_bytes_is_rejected(opcode):
    raises_code(FrameParser(expect_masked=True), ref_encode(opcode, b"x" * 126, b"abcd"), 1002)


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_fragmented_control_frame_is_rejected(opcode):
    raises_code(FrameParser(expect_masked=True), ref_encode(opcode, b"x", b"abcd", fin=False), 1002)


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_without_a_message_is_rejected(fin):
    raises_code(FrameParser(expect_masked=True), ref_encode(OP_CONT, b"x", b"abcd", fin=fin), 1002)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_new_data_frame_while_a_message_is_open_is_rejected(opcode):
    parser = FrameParser(expect_masked=True)
    assert parser.feed(ref_encode(OP_BINARY, b"a", b"abcd", fin=False)) == []
    raises_code(parser, ref_encode(opcode, b"b", b"abcd"), 1002)


def test_too_many_fragments_is_rejected_with_1008_from_the_header():
    parser = FrameParser(expect_masked=True, max_fragments=3)
    parser.feed(ref_encode(OP_BINARY, b"a", b"abcd", fin=False))
    parser.feed(ref_encode(OP_CONT, b"a", b"abcd", fin=False))
    parser.feed(ref_encode(OP_CONT, b"a", b"abcd", fin=False))
    error = raises_code(parser, ref_encode(OP_CONT, b"a", b"abcd")[:2], 1008)  # the header decides
    assert not isinstance(error, MessageTooBig)
    assert error.reason == f"4 fragments for 4 bytes: more than 3 + 1 per {BYTES_PER_EXTRA_FRAGMENT} bytes"


def fragmented(payload: bytes, size: int, opcode: int = OP_BINARY) -> bytes:
    """``payload`` as one message in masked frames of ``size`` bytes (the last may be shorter)."""
    source = MaskSource()
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return b"".join(encode_frame(opcode if i == 0 else OP_CONT, piece, fin=i == len(pieces) - 1,
                                 mask_source=source) for i, piece in enumerate(pieces))


def test_4_mib_in_64_byte_fragments_passes_the_default_limits():
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB
    stream = fragmented(payload, 64)
    parser = FrameParser(expect_masked=True, max_message_size=16 * 1024 * 1024)
    assert feed_in_chunks(parser, stream, [256 * 1024] * (len(stream) // (256 * 1024))) == [(OP_BINARY, payload)]


@pytest.mark.parametrize("max_fragments", [1, 2, 1024])
@pytest.mark.parametrize("extra", [0, 1, 31])
def test_fragments_of_the_allowance_size_or_more_are_never_refused(max_fragments, extra):
    payload = b"z" * (100 * BYTES_PER_EXTRA_FRAGMENT + extra)
    parser = FrameParser(expect_masked=True, max_fragments=max_fragments)
    assert parser.feed(fragmented(payload, BYTES_PER_EXTRA_FRAGMENT)) == [(OP_BINARY, payload)]


def test_a_flood_of_empty_continuations_is_refused_after_max_fragments():
    parser = FrameParser(expect_masked=True)  # 1024 by default
    empty = ref_encode(OP_CONT, b"", b"abcd", fin=False)
    assert parser.feed(ref_encode(OP_TEXT, b"a", b"abcd", fin=False) + empty * 1023) == []
    error = raises_code(parser, empty, 1008)
    assert error.reason.startswith("1025 fragments for 1 bytes")


def test_payload_earns_room_for_more_fragments_but_empty_ones_still_run_out():
    parser = FrameParser(expect_masked=True, max_fragments=2)
    empty = ref_encode(OP_CONT, b"", b"abcd", fin=False)
    parser.feed(ref_encode(OP_BINARY, b"b" * 10 * BYTES_PER_EXTRA_FRAGMENT, b"abcd", fin=False))
    assert parser.feed(empty * 11) == []  # 12 frames: 2 + 10 allowed
    raises_code(parser, empty, 1008)


def test_64_bit_length_with_top_bit_is_rejected():
    header = b"\x82\xff" + struct.pack("!Q", 2**63) + b"abcd"
    raises_code(FrameParser(expect_masked=True), header, 1002)
    raises_code(FrameParser(expect_masked=False, max_message_size=2**64), b"\x82\x7f" + struct.pack("!Q", 2**63 + 5), 1002)


@pytest.mark.parametrize("length_field", [b"\x7e\x04\x01", b"\x7f" + struct.pack("!Q", 1025)])
def test_declared_length_over_limit_is_rejected_from_the_header(length_field):
    parser = FrameParser(expect_masked=False, max_message_size=1024)
    header = bytes([0x82]) + length_field
    error = raises_code(parser, header, 1009)  # no payload fed at all: decided from the header
    assert isinstance(error, MessageTooBig)
    assert error.reason == "frame of 1025 bytes over the max message size of 1024 bytes"


def test_huge_declared_length_is_rejected_without_buffering():
    parser = FrameParser(expect_masked=True)  # default limit: 64 MiB
    raises_code(parser, b"\x82\xff" + struct.pack("!Q", 2**40) + b"abcd" + b"x" * 10, 1009)


def test_fragmented_message_total_over_limit_is_rejected():
    parser = FrameParser(expect_masked=True, max_message_size=10)
    assert parser.feed(ref_encode(OP_TEXT, b"x" * 6, b"abcd", fin=False)) == []
    # the header of the next fragment is enough to decide
    frame = ref_encode(OP_CONT, b"x" * 5, b"abcd")
    error = raises_code(parser, frame[:6], 1009)
    assert error.reason == "fragmented message over the max message size of 10 bytes"


def test_fast_path_respects_the_size_limit():
    parser = FrameParser(expect_masked=True, max_message_size=4)
    raises_code(parser, encode_frame(OP_BINARY, b"12345", mask_source=MaskSource()), 1009)


def test_invalid_utf8_text_is_rejected_with_1007():
    raises_code(FrameParser(expect_masked=True), ref_encode(OP_TEXT, b"ok \xff", b"abcd"), 1007)
    raises_code(FrameParser(expect_masked=False), ref_encode(OP_TEXT, b"\xed\xa0\x80", None), 1007)  # surrogate


def test_invalid_utf8_in_fragmented_text_is_found_in_the_fragment_that_holds_it():
    parser = FrameParser(expect_masked=True)
    assert parser.feed(ref_encode(OP_TEXT, b"\xc3", b"abcd", fin=False)) == []  # incomplete char: fine so far
    raises_code(parser, ref_encode(OP_CONT, b"(", b"abcd", fin=False), 1007)   # not the last fragment


@pytest.mark.parametrize("bad", [b"ok \xff", b"\xe0\x80", b"\xf4\x90"])  # invalid byte, overlong, past U+10FFFF
def test_invalid_utf8_in_the_first_fragment_fails_at_once(bad):
    raises_code(FrameParser(expect_masked=True), ref_encode(OP_TEXT, bad, b"abcd", fin=False), 1007)


def test_text_cut_before_its_last_character_is_complete_fails_at_its_last_fragment():
    parser = FrameParser(expect_masked=True)
    assert parser.feed(ref_encode(OP_TEXT, b"ab\xe2\x82", b"abcd", fin=False)) == []
    raises_code(parser, ref_encode(OP_CONT, b"", b"abcd"), 1007)


def test_each_fragmented_text_message_is_checked_on_its_own():
    parser = FrameParser(expect_masked=True)
    cut = ref_encode(OP_TEXT, b"\xe2\x82", b"abcd", fin=False) + ref_encode(OP_CONT, b"\xac", b"abcd")
    binary = ref_encode(OP_BINARY, b"\xff", b"abcd", fin=False) + ref_encode(OP_CONT, b"\xfe", b"abcd")
    assert parser.feed(cut + binary + cut) == [(OP_TEXT, "€".encode()), (OP_BINARY, b"\xff\xfe"),
                                               (OP_TEXT, "€".encode())]


def test_invalid_utf8_in_binary_is_fine():
    assert FrameParser(expect_masked=True).feed(ref_encode(OP_BINARY, b"\xff", b"abcd")) == [(OP_BINARY, b"\xff")]


def test_parser_is_dead_after_an_error_and_raises_the_same():
    parser = FrameParser(expect_masked=True)
    first = raises_code(parser, encode_frame(OP_TEXT, b"unmasked"), 1002)
    good = encode_frame(OP_TEXT, b"fine", mask_source=MaskSource())
    with pytest.raises(ProtocolError) as info:
        parser.feed(good)
    assert info.value is first
    with pytest.raises(ProtocolError):
        parser.feed(b"")


def test_parser_is_dead_after_an_error_on_the_fast_path():
    parser = FrameParser(expect_masked=True)
    raises_code(parser, encode_frame(OP_TEXT, b"\xff", mask_source=MaskSource()), 1007)
    with pytest.raises(ProtocolError) as info:
        parser.feed(encode_frame(OP_TEXT, b"fine", mask_source=MaskSource()))
    assert info.value.close_code == 1007


def test_constructor_validates_limits():
    with pytest.raises(ValueError):
        FrameParser(expect_masked=True, max_fragments=0)
    with pytest.raises(ValueError):
        FrameParser(expect_masked=True, max_message_size=-1)


def test_module_stays_pure():
    code = (
        "import sys, iwsproxy.frames\n"
        "bad = sorted(m for m in ('gevent', 'socket', 'select', 'selectors', 'flask', 'websocket') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == ""


# --------------------------------------------------------------------------------------
# Property tests against the reference
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    key: bytes | None


payload_sizes = st.one_of(
    st.integers(0, 12),
    st.integers(0, 130),
    st.sampled_from([125, 126, 127, 1000, 65535, 65536, 70000]),
)


@st.composite
def payloads(draw, *, text: bool = False, max_size: int | None = None) -> bytes:
    if text and draw(st.booleans()):
        data = draw(st.text(max_size=60)).encode("utf-8")
    else:
        size = draw(payload_sizes)
        if max_size is not None:
            size = min(size, max_size)
        data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    return data


keys = st.binary(min_size=4, max_size=4)


@st.composite
def valid_streams(draw, *, masked: bool) -> list[Frame]:
    """Well-formed traffic: messages, possibly fragmented, with control frames between fragments."""

    def key():
        return draw(keys) if masked else None

    frames: list[Frame] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 3)) == 0:
            frames.append(Frame(True, 0, draw(st.sampled_from([OP_PING, OP_PONG, OP_CLOSE])), draw(payloads(max_size=125)), key()))
            continue
        opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        if opcode == OP_TEXT:
            data = draw(st.text(max_size=200)).encode("utf-8")
        else:
            data = draw(payloads())
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        for i, piece in enumerate(pieces):
            if i and draw(st.integers(0, 3)) == 0:
                frames.append(Frame(True, 0, OP_PING, draw(payloads(max_size=125)), key()))
            frames.append(Frame(i == len(pieces) - 1, 0, opcode if i == 0 else OP_CONT, piece, key()))
    return frames


@st.composite
def arbitrary_frames(draw, *, expect_masked: bool) -> list[Frame]:
    """Mostly plausible frames with every kind of mistake mixed in, each one rarely."""

    def rarely() -> bool:
        # sampled_from leans to its first elements, so this is True about once in 16 draws
        return draw(st.sampled_from([False] * 15 + [True]))

    frames = []
    message_open = False
    for _ in range(draw(st.integers(0, 8))):
        if rarely():
            opcode = draw(st.sampled_from([3, 7, 0xB, 0xF]))
        elif message_open and draw(st.sampled_from([True, True, False])):
            opcode = OP_CONT
        elif rarely():
            opcode = OP_CONT
        else:
            opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG]))
        control = opcode >= 8
        masked = expect_masked != rarely()
        fin = (not rarely()) if control else draw(st.booleans())
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            message_open = not fin
        frames.append(
            Frame(
                fin=fin,
                rsv=draw(st.sampled_from([1, 2, 4])) if rarely() else 0,
                opcode=opcode,
                payload=draw(payloads(text=True, max_size=200 if control and rarely() else 125 if control else None)),
                key=draw(keys) if masked else None,
            )
        )
    return frames


def chunk_sizes(seed: int, total: int, mode: int) -> Iterator[int]:
    """Chunk sizes covering ``total`` bytes: one byte each (0), one chunk (1), random (2)."""
    rng = random.Random(seed)
    if mode == 1:
        yield total
        return
    limit = 1 if mode == 0 else rng.choice([2, 7, 130, 5000, 100000])
    while total > 0:
        size = rng.randint(1, limit)
        total -= size
        yield size


def traffic_chunks(stream: bytes, split_seed: int, split_mode: int) -> Iterator[int]:
    if split_mode == 0 and len(stream) > 3000:
        split_mode = 2  # byte at a time on 70 kB is slow without adding anything
    return chunk_sizes(split_seed, len(stream), split_mode)


#: valid traffic, fed in chunks: byte by byte, whole, or at random
valid_traffic = given(masked=st.booleans(), frames=st.data(), split_seed=st.integers(0, 2**32),
                      split_mode=st.sampled_from([0, 1, 2, 2, 2]))
traffic_settings = settings(max_examples=200, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@traffic_settings
@valid_traffic
def test_valid_traffic_matches_reference(masked, frames, split_seed, split_mode):
    frames = frames.draw(valid_streams(masked=masked))
    stream = b""
    for frame in frames:
        source = FixedMask(frame.key) if frame.key is not None else None
        encoded = encode_frame(frame.opcode, frame.payload, mask_source=source, fin=frame.fin)
        assert encoded == ref_encode(frame.opcode, frame.payload, frame.key, frame.fin)
        stream += encoded
    expected, error = ref_parse(stream, expect_masked=masked, max_message_size=2**26, max_fragments=1024)
    assert error is None
    parser = FrameParser(expect_masked=masked)
    assert feed_in_chunks(parser, stream, traffic_chunks(stream, split_seed, split_mode)) == expected


def split_expected(expected: list[tuple[int, bytes]]) -> tuple[list, list]:
    """What split mode gives for the events ``expected`` in order: data and controls, up to the first CLOSE."""
    data, controls = [], []
    for op, payload in expected:
        (controls if op >= 8 else data).append((op, payload))
        if op == OP_CLOSE:
            break
    return data, controls


@traffic_settings
@valid_traffic
def test_split_controls_gives_the_same_frames_data_and_controls_apart(masked, frames, split_seed, split_mode):
    frames = frames.draw(valid_streams(masked=masked))
    stream = b"".join(ref_encode(f.opcode, f.payload, f.key, f.fin) for f in frames)
    expected, _ = ref_parse(stream, expect_masked=masked, max_message_size=2**26, max_fragments=1024)
    parser = FrameParser(expect_masked=masked, split_controls=True)
    data, controls, pos = [], [], 0
    for size in traffic_chunks(stream, split_seed, split_mode):
        data += parser.feed(stream[pos : pos + size])
        controls += parser.controls
        pos += size
    assert (data, controls) == split_expected(expected)


def test_split_controls_stops_at_close_and_keeps_controls_in_order():
    source = MaskSource()
    frame = lambda op, payload: encode_frame(op, payload, mask_source=source)  # noqa: E731
    parser = FrameParser(expect_masked=True, split_controls=True)
    assert parser.feed(frame(OP_BINARY, b"a") + frame(OP_PONG, b"1") + frame(OP_TEXT, b"b")) == [
        (OP_BINARY, b"a"), (OP_TEXT, b"b")]
    assert parser.controls == [(OP_PONG, b"1")]
    assert parser.feed(frame(OP_BINARY, b"c")) == [(OP_BINARY, b"c")] and parser.controls == ()
    after_close = frame(OP_PING, b"2") + frame(OP_CLOSE, b"\x03\xe8") + frame(OP_BINARY, b"late")
    assert parser.feed(after_close) == []
    assert parser.controls == [(OP_PING, b"2"), (OP_CLOSE, b"\x03\xe8")]
    assert parser.feed(frame(OP_BINARY, b"later") + b"\xff\xff") == [] and parser.controls == ()


def test_split_controls_keeps_what_came_before_a_violation():
    source = MaskSource()
    good = encode_frame(OP_BINARY, b"a", mask_source=source) + encode_frame(OP_PING, b"p", mask_source=source)
    parser = FrameParser(expect_masked=True, split_controls=True)
    with pytest.raises(ProtocolError) as info:
        parser.feed(good + encode_frame(OP_TEXT, b"\xff", mask_source=source))
    assert info.value.events == [(OP_BINARY, b"a")] and parser.controls == [(OP_PING, b"p")]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    expect_masked=st.booleans(),
    frames=st.data(),
    max_message_size=st.sampled_from([0, 10, 130, 70000, 2**26, 2**26]),
    max_fragments=st.sampled_from([1, 2, 3, 1024]),
    split_seed=st.integers(0, 2**32),
    split_mode=st.sampled_from([1, 2, 2]),
)
def test_arbitrary_frames_match_reference_events_and_close_code(
    expect_masked, frames, max_message_size, max_fragments, split_seed, split_mode
):
    frames = frames.draw(arbitrary_frames(expect_masked=expect_masked))
    stream = b"".join(ref_encode(f.opcode, f.payload, f.key, f.fin, f.rsv) for f in frames)
    expected, expected_code = ref_parse(
        stream, expect_masked=expect_masked, max_message_size=max_message_size, max_fragments=max_fragments
    )
    event(f"close code {expected_code}, {len(expected)} events")
    parser = FrameParser(expect_masked=expect_masked, max_message_size=max_message_size, max_fragments=max_fragments)
    events: list[tuple[int, bytes]] = []
    code = None
    pos = 0
    for size in chunk_sizes(split_seed, len(stream), split_mode):
        if pos >= len(stream):
            break
        try:
            events += parser.feed(stream[pos : pos + size])
        except ProtocolError as exc:
            code = exc.close_code
            break
        pos += size
    assert code == expected_code
    if code is None:
        assert events == expected
    else:
        # events completed in the chunk that raised are dropped with it
        assert events == expected[: len(events)]


def test_c_masking_is_in_use_and_matches_the_python_one():
    import os

    from iwsproxy import frames
    assert frames.apply_mask is frames._c_apply_mask, "python-websockets' speedups should be installed"
    key = os.urandom(4)
    for size in (0, 1, 3, 4, 5, 125, 126, 65536, 1 << 20):
        data = os.urandom(size)
        assert frames.apply_mask(data, key) == frames.python_apply_mask(data, key)
        assert frames.apply_mask(memoryview(data), key) == frames.python_apply_mask(data, key)


# --------------------------------------------------------------------------------------
# encode_messages: the write batch of the hot path
# --------------------------------------------------------------------------------------


class RecordingMask(MaskSource):
    """A MaskSource that remembers the keys it gave, so a batch can be compared frame by frame."""

    def __init__(self):
        super().__init__()
        self.given = []

    def keys(self, count: int) -> bytes:
        keys = super().keys(count)
        self.given += [keys[i : i + 4] for i in range(0, len(keys), 4)]
        return keys


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]),
                                   st.binary(max_size=300) | st.sampled_from([b"x" * 126, b"y" * 65536])),
                         max_size=8),
       masked=st.booleans(), ping=st.none() | st.binary(max_size=125))
def test_encode_messages_equals_one_encode_frame_per_message(messages, masked, ping):
    source = RecordingMask() if masked else None
    batch = encode_messages(messages, source, ping)
    keys = iter(source.given if masked else [])
    expected = b"".join(ref_encode(op, payload, next(keys) if masked else None) for op, payload in messages)
    if ping is not None:
        expected += ref_encode(OP_PING, ping, next(keys) if masked else None)
    assert type(batch) is bytes and batch == expected


def test_encode_messages_refuses_control_and_continuation_frames():
    for opcode in (OP_CONT, OP_PING, OP_CLOSE):
        with pytest.raises(ValueError):
            encode_messages([(opcode, b"")])
    assert encode_messages([]) == b""
