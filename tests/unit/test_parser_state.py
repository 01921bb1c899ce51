"""A FrameParser's state carried to another parser mid-frame (a pipe moving to another process)."""

import pytest

from iwsproxy.frames import OP_BINARY, OP_TEXT, FrameParser, MaskSource, encode_frame


def _fragments(opcode: int, payload: bytes, parts: int, masked: bool) -> bytes:
    size = len(payload) // parts
    out = b""
    for i in range(parts):
        chunk = payload[i * size:] if i == parts - 1 else payload[i * size:(i + 1) * size]
        out += encode_frame(opcode if i == 0 else 0, chunk, fin=i == parts - 1,
                            mask_source=MaskSource() if masked else None)
    return out


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("opcode,payload", [(OP_TEXT, "héllo wörld €".encode() * 20), (OP_BINARY, bytes(range(256)))])
def test_every_split_point_gives_the_same_messages(masked, opcode, payload):
    wire = _fragments(opcode, payload, 3, masked) + encode_frame(OP_BINARY, b"next", mask_source=MaskSource() if masked else None)
    for cut in range(0, len(wire), 7):
        first = FrameParser(expect_masked=masked, split_controls=True)
        events = first.feed(wire[:cut])
        second = FrameParser(expect_masked=masked, split_controls=True)
        second.load_state(first.export_state())
        events += second.feed(wire[cut:])
        assert events == [(opcode, payload), (OP_BINARY, b"next")], cut


def test_a_failed_parser_has_no_state_to_carry_and_a_bad_state_is_refused():
    parser = FrameParser(expect_masked=True)
    with pytest.raises(Exception):
        parser.feed(encode_frame(OP_TEXT, b"x"))  # unmasked from a client
    with pytest.raises(ValueError):
        parser.export_state()
    state = FrameParser(expect_masked=True).export_state()
    with pytest.raises(ValueError):
        FrameParser(expect_masked=True).load_state({**state, "opcode": 9})
