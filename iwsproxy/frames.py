"""A sans-I/O RFC 6455 frame codec: bytes in, ``(opcode, payload)`` events out.  [pure]

Both sides of the proxy use it: the client side parses MASKED frames, the backend side
parses UNMASKED frames and writes masked ones. It never touches a socket and imports
neither gevent nor socket (a test checks that), so the same code serves the proxy,
the echo backend and the tests.

Performance is the point of most of the choices below: there is no per-byte Python
loop anywhere. Masking runs in C (:mod:`iwsproxy.masking`: python-websockets' ``apply_mask``,
or two big integers XORed), headers are read with ``struct`` and those of small frames written
from a table, a write batch takes its mask keys in one slice, unconsumed bytes live
in one ``bytearray`` trimmed once per ``feed`` call, and a whole small data frame
(the usual one) skips every header check it cannot fail.
"""

from __future__ import annotations

import codecs
import struct

from iwsproxy.accel import speedups
from iwsproxy.exceptions import MessageTooBig, ProtocolError
from iwsproxy.masking import MaskSource, _c_apply_mask, apply_mask, python_apply_mask  # noqa: F401 (re-exported)

__all__ = [
    "OP_CONT",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "apply_mask",
    "MaskSource",
    "encode_frame",
    "encode_messages",
    "encode_close_payload",
    "parse_close_payload",
    "FrameParser",
    "BYTES_PER_EXTRA_FRAGMENT",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_DATA_OPCODES = frozenset((OP_TEXT, OP_BINARY))
_CONTROL_OPCODES = frozenset((OP_CLOSE, OP_PING, OP_PONG))
_KNOWN_OPCODES = _DATA_OPCODES | _CONTROL_OPCODES | {OP_CONT}

_MAX_CONTROL_PAYLOAD = 125
_MAX_CLOSE_REASON_BYTES = _MAX_CONTROL_PAYLOAD - 2

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_HEAD_2 = struct.Struct("!BB")
_HEAD_4 = struct.Struct("!BBH")
_HEAD_10 = struct.Struct("!BBQ")

#: past ``max_fragments`` frames, a fragmented message may have one more frame for each this many
#: bytes of its payload: fragments of this size or more on average are never refused, and the
#: frames of one message stay within ``max_fragments + max_message_size / BYTES_PER_EXTRA_FRAGMENT``
BYTES_PER_EXTRA_FRAGMENT = 32

_utf8_decode = codecs.utf_8_decode
# the C loops (iwsproxy.accel), or None: the pure-Python code below does the same
_scan_frames = speedups.scan_frames if speedups else None
_encode_data_frames = speedups.encode_data_frames if speedups else None


def _small_headers(mask_bit: int) -> tuple:
    """Header bytes of every whole TEXT/BINARY frame under 126 bytes, by opcode then length."""
    table = [None] * 16
    for opcode in _DATA_OPCODES:
        table[opcode] = [_HEAD_2.pack(0x80 | opcode, mask_bit | n) for n in range(126)]
    return tuple(table)


_SMALL_HEADERS = {0: _small_headers(0), 0x80: _small_headers(0x80)}


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    mask_source: MaskSource | None = None,
    fin: bool = True,
) -> bytes:
    """One frame as ONE bytes object; masked with a fresh key when ``mask_source`` is given.

    ``mask_source=None`` is the server role (frames to a client are never masked).
    Raises ``ValueError`` for an unknown opcode or a control frame that breaks the
    control-frame rules: those are bugs in the caller, not in a peer.
    """
    if opcode not in _KNOWN_OPCODES:
        raise ValueError(f"unknown opcode {opcode:#x}")
    n = len(payload)
    if opcode in _CONTROL_OPCODES and (n > _MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("control frames carry at most 125 bytes and are never fragmented")
    b0 = (0x80 | opcode) if fin else opcode
    mask_bit = 0x80 if mask_source is not None else 0
    if n < 126:
        header = _HEAD_2.pack(b0, mask_bit | n)
    elif n < 0x10000:
        header = _HEAD_4.pack(b0, mask_bit | 126, n)
    else:
        header = _HEAD_10.pack(b0, mask_bit | 127, n)
    if mask_source is None:
        return header + payload
    key = mask_source.next_key()
    return header + key + apply_mask(payload, key)


def encode_messages(messages: list[tuple[int, bytes]], mask_source: MaskSource | None = None,
                    ping: bytes | None = None) -> bytes:
    """A write batch: whole TEXT/BINARY messages, one frame each, then an optional Ping.

    The same bytes as joining :func:`encode_frame` of each, the batch's mask keys taken
    at once: this is the proxy's hot path in both directions. Raises ``ValueError`` for
    a control or continuation opcode, or a ping over 125 bytes.
    """
    if _encode_data_frames is None or type(messages) is not list:
        return python_encode_messages(messages, mask_source, ping)
    if mask_source is None:
        return _encode_data_frames(messages, 0, b"", ping)
    return _encode_data_frames(messages, 0x80, mask_source.keys(len(messages) + (ping is not None)), ping)


def python_encode_messages(messages: list[tuple[int, bytes]], mask_source: MaskSource | None = None,
                           ping: bytes | None = None) -> bytes:
    """:func:`encode_messages` in pure Python: one join (no per-frame header + payload
    copy), headers of small frames from a table."""
    parts: list = []
    append = parts.append
    mask_bit = 0x80 if mask_source is not None else 0
    headers = _SMALL_HEADERS[mask_bit]
    keys = mask_source.keys(len(messages) + (ping is not None)) if mask_bit else b""
    k = 0
    for opcode, payload in messages:
        table = headers[opcode] if 0 <= opcode < 16 else None
        if table is None:
            raise ValueError(f"not a data opcode: {opcode:#x}")
        n = len(payload)
        if n < 126:
            append(table[n])
        elif n < 0x10000:
            append(_HEAD_4.pack(0x80 | opcode, mask_bit | 126, n))
        else:
            append(_HEAD_10.pack(0x80 | opcode, mask_bit | 127, n))
        if mask_bit:
            key = keys[k : k + 4]
            k += 4
            append(key)
            append(apply_mask(payload, key))
        else:
            append(payload)
    if ping is not None:
        if len(ping) > _MAX_CONTROL_PAYLOAD:
            raise ValueError("control frames carry at most 125 bytes and are never fragmented")
        append(_HEAD_2.pack(0x80 | OP_PING, mask_bit | len(ping)))
        if mask_bit:
            key = keys[k : k + 4]
            append(key)
            append(apply_mask(ping, key))
        else:
            append(ping)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def encode_close_payload(code: int | None, reason: str = "") -> bytes:
    """A CLOSE payload: the 2-byte code then the UTF-8 reason cut to fit 125 bytes.

    ``code=None`` gives the empty payload (a close without a status). The reason is cut
    at a character boundary. Raises ``ValueError`` for a code that may not be sent
    (RFC 6455 section 7.4: 1005, 1006, 1015, unassigned and out-of-range codes).
    """
    if code is None:
        return b""
    if not _is_sendable_close_code(code):
        raise ValueError(f"close code {code} may not be sent on the wire")
    encoded = reason.encode("utf-8")
    if len(encoded) > _MAX_CLOSE_REASON_BYTES:
        # "ignore" drops only the character that the cut split in two.
        encoded = encoded[:_MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return _U16.pack(code) + encoded


def parse_close_payload(payload: bytes) -> tuple[int | None, str]:
    """``(code, reason)`` from a CLOSE payload; ``(None, "")`` for an empty one.

    Raises ``ProtocolError`` 1002 for a 1-byte payload or a code that may not appear on
    the wire, and 1007 for a reason that is not valid UTF-8.
    """
    if not payload:
        return None, ""
    if len(payload) < 2:
        raise ProtocolError("close payload of 1 byte", 1002)
    (code,) = _U16.unpack_from(payload)
    if not _is_sendable_close_code(code):
        raise ProtocolError(f"invalid close code {code}", 1002)
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("close reason is not valid UTF-8", 1007) from exc
    return code, reason


def _is_sendable_close_code(code: int) -> bool:
    # 1000-1003 and 1007-1014 are registered; 1004 is reserved; 1005, 1006 and 1015
    # must never be sent; 1016-2999 are unassigned; 3000-4999 are for libraries/apps.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameParser:
    """Incremental frame parser for one direction of one connection.

    ``feed(chunk)`` returns the complete events in order: data messages reassembled
    (opcode of the first frame), control frames as they arrive, even between the
    fragments of a data message. A peer that breaks the protocol gets ``ProtocolError``;
    the parser is then dead and every later ``feed`` raises the same error.
    The events completed earlier in the chunk that raised are on the error, as ``events``.
    CLOSE payloads are passed through as they are: check them with ``parse_close_payload``.

    Limits, each decided from a frame's header, before its payload is buffered:

    * ``max_message_size``: a frame, or a fragmented message so far, longer than this gets
      ``MessageTooBig`` (1009), its reason naming the limit;
    * ``max_fragments``: a fragmented message may have this many frames whatever its size, and
      past that one more for each :data:`BYTES_PER_EXTRA_FRAGMENT` bytes of its payload (this
      frame's included); one more frame gets ``ProtocolError`` 1008. This bounds the work and
      memory that floods of tiny or empty fragments cost without refusing any message whose
      fragments average that size or more.

    Text is checked as UTF-8 fragment by fragment: a fragment that no continuation can make
    valid gets ``ProtocolError`` 1007 when it arrives (a character split across fragments is fine).

    With ``split_controls`` (the proxy's connections), ``feed`` returns only the data
    messages, ready to be handed on as they are, and puts the control frames in
    ``controls`` (empty in the usual case); parsing stops at a CLOSE, which is
    therefore always the last control and follows every data message before it.
    """

    __slots__ = (
        "controls",
        "_split",
        "_closed",
        "_expect_masked",
        "_mask_bit",
        "_max_message_size",
        "_max_fragments",
        "_c_max_size",
        "_buf",
        "_need",
        "_msg_opcode",
        "_msg_data",
        "_msg_frames",
        "_msg_utf8",
        "_error",
    )

    def __init__(
        self,
        *,
        expect_masked: bool,
        max_message_size: int = 64 * 1024 * 1024,
        max_fragments: int = 1024,
        split_controls: bool = False,
    ):
        if max_message_size < 0 or max_fragments < 1:
            raise ValueError("max_message_size must be >= 0 and max_fragments >= 1")
        self._split = split_controls
        self.controls: list[tuple[int, bytes]] | tuple = ()  # the last feed's control frames (split mode)
        self._closed = False  # split mode: a CLOSE was parsed, nothing after it is
        self._expect_masked = expect_masked
        self._mask_bit = 0x80 if expect_masked else 0
        self._max_message_size = max_message_size
        self._max_fragments = max_fragments
        self._c_max_size = min(max_message_size, 0xFFFF)  # C takes 7- and 16-bit lengths only
        self._buf = bytearray()  # bytes received but not yet consumed
        self._need = 0  # len(_buf) needed before parsing is worth another try
        self._msg_opcode = 0  # opcode of the open fragmented message, 0 if none
        self._msg_data = bytearray()  # its payload so far
        self._msg_frames = 0  # its frames so far
        self._msg_utf8: bytes | None = None  # text only: its last bytes, a character not yet complete
        self._error: ProtocolError | None = None

    def export_state(self) -> dict:
        """What this parser holds between two ``feed`` calls (bytes of a frame not yet complete, the
        fragmented message so far), as a dict of ints, bools and bytes, for :meth:`load_state` in
        another process. Raises ValueError for a parser that has failed (it has nothing to carry)."""
        if self._error is not None:
            raise ValueError("the parser has failed")
        return {"buf": bytes(self._buf), "need": self._need, "closed": self._closed, "opcode": self._msg_opcode,
                "data": bytes(self._msg_data), "frames": self._msg_frames, "utf8": self._msg_utf8}

    def load_state(self, state: dict) -> None:
        """Continue where the parser that gave ``state`` (:meth:`export_state`) stopped. Raises
        ValueError (or TypeError, KeyError) for a state that is not one."""
        opcode, utf8 = state["opcode"], state["utf8"]
        if opcode not in (0, 1, 2) or (utf8 is not None and (opcode != 1 or len(utf8) > 3)):
            raise ValueError("not a parser state")
        self._buf, self._msg_data = bytearray(state["buf"]), bytearray(state["data"])
        self._need, self._msg_frames = int(state["need"]), int(state["frames"])
        self._closed, self._msg_opcode, self._msg_utf8 = bool(state["closed"]), opcode, utf8

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        """Take any chunk of bytes; return the events it completes, in order."""
        if self._error is not None:
            raise self._error
        if self.controls:
            self.controls = ()
        if self._closed:
            return []
        buf = self._buf
        if not buf:
            if type(data) is bytes:
                if _scan_frames is None:
                    events = self._fast_path(data)
                    if events is not None:
                        return events
                elif not self._msg_opcode:  # the usual chunk: whole frames, all of them for C
                    events = []
                    controls = [] if self._split else None
                    pos = _scan_frames(data, 0, self._mask_bit, self._c_max_size, events, controls)
                    if pos == len(data):
                        if controls:
                            self.controls = controls
                        return events
                    return self._parse(data, pos, events, controls)
                return self._parse(data)
            buf += data
            return self._parse(buf)
        buf += data
        if len(buf) < self._need:
            return []
        return self._parse(buf)

    def _fast_path(self, data: bytes) -> list[tuple[int, bytes]] | None:
        """One whole, small, unfragmented TEXT/BINARY frame, exactly: the usual chunk.

        Returns None to fall back to the general path (which handles every error).
        """
        n = len(data)
        if n < 2 or self._msg_opcode:
            return None
        b0, b1 = data[0], data[1]
        if (b0 != 0x81 and b0 != 0x82) or (b1 & 0x80) != self._mask_bit:
            return None
        length = b1 & 0x7F
        if length > 125 or length > self._max_message_size:
            return None
        if self._mask_bit:
            if n != 6 + length:
                return None
            payload = apply_mask(data[6:], data[2:6])
        else:
            if n != 2 + length:
                return None
            payload = data[2:]
        if b0 == 0x81:
            try:
                self._check_text(payload)
            except ProtocolError as exc:
                self._error = exc
                raise
        return [(b0 & 0x0F, payload)]

    def _parse(self, src: bytes | bytearray, pos: int = 0, events: list | None = None,
               controls: list | None = None) -> list[tuple[int, bytes]]:
        """Consume every complete frame of ``src`` (``self._buf`` or a fresh bytes chunk) from
        ``pos`` on; ``events`` and ``controls``, if given, hold what came before ``pos``."""
        if events is None:
            events = []
            controls = [] if self._split else None  # split mode: the control frames, in order
        append = events.append
        end = len(src)
        need = 0
        mask_bit = self._mask_bit
        # a whole small data frame (second header byte in [lo, hi]) needs none of the checks below;
        # none qualifies while a fragmented message is open
        lo = mask_bit
        fast_hi = mask_bit + min(125, self._max_message_size)
        hi = fast_hi if not self._msg_opcode else -1
        head = 6 if mask_bit else 2
        # slices of a bytes chunk are taken from it; those of the buffer (a bytearray) through a
        # memoryview, released before the buffer is trimmed
        view = src if type(src) is bytes else memoryview(src)
        scan = _scan_frames
        max_size = self._c_max_size
        try:
            while end - pos >= 2:
                if scan is not None and hi >= 0:  # in C: whole data, ping and pong frames, up to any other
                    pos = scan(src, pos, mask_bit, max_size, events, controls)
                    if end - pos < 2:
                        break
                b0 = src[pos]
                b1 = src[pos + 1]
                if 0x81 <= b0 <= 0x82 and lo <= b1 <= hi:
                    start = pos + head
                    stop = start + b1 - lo
                    if stop > end:
                        need = stop - pos
                        break
                    if mask_bit:
                        payload = apply_mask(view[start:stop], src[start - 4 : start])
                    elif view is src:
                        payload = src[start:stop]
                    else:
                        payload = bytes(view[start:stop])
                    pos = stop
                    if b0 == 0x81:
                        self._check_text(payload)
                    append((b0 & 0x0F, payload))
                    continue
                length = b1 & 0x7F
                opcode = b0 & 0x0F
                fin = b0 & 0x80
                self._check_header(b0, b1, opcode, fin)
                start = pos + 2
                if length == 126:
                    if end - pos < 4:
                        break
                    (length,) = _U16.unpack_from(src, start)
                    start += 2
                elif length == 127:
                    if end - pos < 10:
                        break
                    (length,) = _U64.unpack_from(src, start)
                    if length >> 63:
                        raise ProtocolError("64-bit payload length has its top bit set", 1002)
                    start += 8
                if opcode == OP_CONT:
                    self._check_fragment(length)
                elif opcode < 8 and length > self._max_message_size:
                    raise MessageTooBig(
                        f"frame of {length} bytes over the max message size of {self._max_message_size} bytes",
                        1009,
                    )
                if self._mask_bit:
                    start += 4
                stop = start + length
                if stop > end:
                    need = stop - pos
                    break
                if self._mask_bit:
                    payload = apply_mask(view[start:stop], src[start - 4 : start])
                else:
                    payload = bytes(view[start:stop])
                pos = stop
                if opcode >= 8:
                    if not self._split:
                        append((opcode, payload))
                        continue
                    controls.append((opcode, payload))
                    if opcode == OP_CLOSE:
                        self._closed = True
                        pos = end  # what follows a CLOSE is not for us
                        break
                elif opcode:  # TEXT or BINARY (header checks ruled out the rest)
                    if fin:
                        if opcode == OP_TEXT:
                            self._check_text(payload)
                        append((opcode, payload))
                    else:
                        self._msg_opcode = opcode
                        hi = -1
                        self._msg_data = bytearray(payload)
                        self._msg_frames = 1
                        if opcode == OP_TEXT:
                            self._msg_utf8 = b""
                            self._check_text_fragment(payload, False)
                else:  # CONT
                    self._msg_data += payload
                    self._msg_frames += 1
                    if self._msg_utf8 is not None:
                        self._check_text_fragment(payload, fin)
                    if fin:
                        append((self._msg_opcode, bytes(self._msg_data)))
                        self._msg_opcode = 0
                        hi = fast_hi
                        self._msg_data = bytearray()
                        self._msg_frames = 0
                        self._msg_utf8 = None
        except ProtocolError as exc:
            exc.events = events  # what was complete before the violation: the caller may deliver it
            self._error = exc
            self._buf = self._msg_data = bytearray()
            raise
        finally:
            if view is not src:
                view.release()
            if controls:
                self.controls = controls
        buf = self._buf
        if src is buf:
            if pos:
                del buf[:pos]
        elif pos < end:
            buf += src[pos:] if pos else src
        self._need = need
        return events

    def _check_header(self, b0: int, b1: int, opcode: int, fin: int) -> None:
        """Every rule that the first two header bytes (and the message state) decide."""
        if b0 & 0x70:
            raise ProtocolError("reserved bits RSV1-3 set without a negotiated extension", 1002)
        if opcode not in _KNOWN_OPCODES:
            raise ProtocolError(f"unknown opcode {opcode:#x}", 1002)
        if opcode >= 8:
            if not fin:
                raise ProtocolError("fragmented control frame", 1002)
            if (b1 & 0x7F) > _MAX_CONTROL_PAYLOAD:
                raise ProtocolError("control frame payload over 125 bytes", 1002)
        if (b1 & 0x80) != self._mask_bit:
            raise ProtocolError(
                "unmasked frame from a client" if self._expect_masked else "masked frame from a server",
                1002,
            )
        if opcode == OP_CONT:
            if not self._msg_opcode:
                raise ProtocolError("continuation frame without a message in progress", 1002)
        elif opcode < 8 and self._msg_opcode:
            raise ProtocolError("new data frame while a fragmented message is open", 1002)

    def _check_fragment(self, length: int) -> None:
        """The limits on the open fragmented message, given the declared ``length`` of its next frame."""
        size = len(self._msg_data) + length
        if size > self._max_message_size:
            raise MessageTooBig(
                f"fragmented message over the max message size of {self._max_message_size} bytes", 1009
            )
        if self._msg_frames >= self._max_fragments + size // BYTES_PER_EXTRA_FRAGMENT:
            raise ProtocolError(
                f"{self._msg_frames + 1} fragments for {size} bytes: more than {self._max_fragments} "
                f"+ 1 per {BYTES_PER_EXTRA_FRAGMENT} bytes",
                1008,
            )

    def _check_text_fragment(self, payload: bytes, final: bool) -> None:
        """Check the next fragment of a text message as UTF-8, given the cut character before it."""
        if not self._msg_utf8:
            if payload.isascii():
                return
            data = payload
        else:
            data = self._msg_utf8 + payload
        try:
            _, checked = _utf8_decode(data, "strict", final)
        except UnicodeDecodeError as exc:
            raise ProtocolError("text message is not valid UTF-8", 1007) from exc
        self._msg_utf8 = data[checked:] if checked < len(data) else b""

    @staticmethod
    def _check_text(payload: bytes) -> None:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("text message is not valid UTF-8", 1007) from exc
