"""A WebSocket connection over a (gevent) socket, framed by :mod:`iwsproxy.frames`.

Both sides of a pipe use it: the client side in the server role (reads masked
frames, writes unmasked ones) and the backend side in the client role. Reads
take whole chunks (many frames per ``recv``); writes put every frame of a batch
into one ``sendall``. Writers are serialised by a lock so that two greenlets can
never interleave frames on one socket.
"""

from __future__ import annotations

import socket

from gevent.lock import Semaphore

from ..buffer import Message
from ..exceptions import ProtocolError
from ..frames import OP_CLOSE, OP_PING, OP_PONG, FrameParser, MaskSource, encode_close_payload, encode_frame

__all__ = ["Connection", "ConnectionLost"]

READ_CHUNK = 256 * 1024


class ConnectionLost(Exception):
    """Internal to the I/O layer: the socket failed or reached EOF."""


class Connection:
    __slots__ = ("sock", "_recv", "_prefix", "_parser", "_mask", "_lock", "_error", "close_sent", "closed",
                 "__weakref__")

    def __init__(self, sock: socket.socket, *, server_side: bool, max_message_size: int,
                 max_fragments: int = 1024, prefix: bytes = b"", mask_source: MaskSource | None = None):
        self.sock = sock
        self._recv = sock.recv
        self._prefix = prefix or None  # bytes that arrived with the HTTP request (client side)
        self._parser = FrameParser(expect_masked=server_side, max_message_size=max_message_size,
                                   max_fragments=max_fragments)
        # client role (towards backends): masks from a pool, best shared by the process's connections
        self._mask = None if server_side else (mask_source or MaskSource())
        self._lock = Semaphore()
        self._error: ProtocolError | None = None
        self.close_sent = False
        self.closed = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (e.g. a Unix socket in tests)

    # ---- reading (one reader greenlet per connection) ----
    def read(self) -> list[Message]:
        """Block until at least one complete event arrives; raise ConnectionLost at EOF.

        Raises :class:`~iwsproxy.exceptions.ProtocolError` on a protocol violation.
        """
        if self._error is not None:
            raise self._error
        while True:
            try:
                data = self._recv(READ_CHUNK) if self._prefix is None else self._take_prefix()
            except OSError as exc:
                raise ConnectionLost(str(exc) or type(exc).__name__) from exc
            if not data:
                raise ConnectionLost("connection closed without a close frame")
            try:
                events = self._parser.feed(data)
            except ProtocolError as exc:
                if not exc.events:
                    raise
                self._error = exc  # deliver the good messages first; the next read raises
                return exc.events
            if events:
                return events

    def _take_prefix(self) -> bytes:
        prefix, self._prefix = self._prefix, None
        return prefix

    # ---- writing (any greenlet; serialised) ----
    def encode(self, messages: list[Message], ping: bytes | None = None) -> bytes:
        mask = self._mask
        frames = [encode_frame(op, payload, mask_source=mask) for op, payload in messages]
        if ping is not None:
            frames.append(encode_frame(OP_PING, ping, mask_source=mask))
        return frames[0] if len(frames) == 1 else b"".join(frames)

    def send(self, messages: list[Message], ping: bytes | None = None) -> None:
        """Write data messages (and an optional trailing ping) in one write."""
        if messages or ping is not None:
            self.send_raw(self.encode(messages, ping))

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            if self.close_sent:
                raise ConnectionLost("close already sent")
            try:
                # one send() usually takes it all; sendall() only for the rest (it costs a getsockopt per call)
                sent = self.sock.send(data)
                if sent < len(data):
                    self.sock.sendall(memoryview(data)[sent:])
            except OSError as exc:
                raise ConnectionLost(str(exc) or type(exc).__name__) from exc

    def pong(self, payload: bytes) -> None:
        self.send_raw(encode_frame(OP_PONG, payload, mask_source=self._mask))

    def send_close(self, code: int | None, reason: str = "") -> bool:
        """Send a Close frame once; returns False if one was already sent or the socket failed."""
        with self._lock:
            if self.close_sent or self.closed:
                return False
            self.close_sent = True
            frame = encode_frame(OP_CLOSE, encode_close_payload(code, reason), mask_source=self._mask)
            try:
                self.sock.sendall(frame)
            except OSError:
                return False
            return True

    def abort(self) -> None:
        """Drop the connection at once (no close handshake); idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
