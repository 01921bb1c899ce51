"""A WebSocket connection over a (gevent) socket, framed by :mod:`iwsproxy.frames`.

Both sides of a pipe use it: the client side in the server role (reads masked
frames, writes unmasked ones) and the backend side in the client role. Reads
take whole chunks (many frames per ``recv``), and after a burst read whole the
next one waits for readiness before it calls ``recv``; writes put every frame of
a batch into one ``sendall``. Writers are serialised by a lock so that two
greenlets can never interleave frames on one socket.

An idle connection can be *parked*: :meth:`Connection.park` interrupts a
reader blocked in :meth:`Connection.read` (and only there, so nothing read is
lost) with :class:`Parked`; the reader's greenlet then ends and
:meth:`Connection.call_when_readable` brings a new one when data arrives. A
blocked greenlet costs about 8 KiB (mostly its own Python frame stack), an idle
watcher a few hundred bytes. A reader brought back by control frames alone (the
pong to a keepalive) parks again by itself: see :meth:`Connection.resume`.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from collections.abc import Callable
from time import monotonic

from gevent import Timeout, get_hub
from gevent.socket import wait_write
from gevent.event import Event
from gevent.lock import Semaphore

from ..buffer import Message
from ..exceptions import ProtocolError
from ..frames import (OP_CLOSE, OP_PONG, FrameParser, MaskSource, encode_close_payload, encode_frame,
                      encode_messages)

__all__ = ["Connection", "ConnectionLost", "Parked"]

READ_CHUNK = 256 * 1024
CLOSE_SEND_TIMEOUT_S = 2.0  # how long a Close waits for a peer that takes none of our bytes
_STALL_S = 0.001  # a send that took longer waited for the peer
_BYTE_COUNT = struct.Struct("i")  # FIONREAD's and TIOCOUTQ's answer


class ConnectionLost(Exception):
    """Internal to the I/O layer: the socket failed or reached EOF."""


class Parked(Exception):
    """Internal to the I/O layer: raised in a reader waiting for data when its connection is parked."""


class Connection:
    __slots__ = ("sock", "_recv", "_prefix", "_parser", "_mask", "_lock", "_error", "close_sent", "closed",
                 "controls", "reads", "_plain", "_wait_first", "_idle_watcher", "_closed_event",
                 "_resumed", "_repark", "sends", "stalled_at", "stall_timeout_s", "__weakref__")

    def __init__(self, sock: socket.socket, *, server_side: bool, max_message_size: int,
                 max_fragments: int = 1024, prefix: bytes = b"", mask_source: MaskSource | None = None):
        self.sock = sock
        self._recv = sock.recv
        self._prefix = prefix or None  # bytes that arrived with the HTTP request (client side)
        self._parser = FrameParser(expect_masked=server_side, max_message_size=max_message_size,
                                   max_fragments=max_fragments, split_controls=True)
        # client role (towards backends): masks from a pool, best shared by the process's connections
        self._mask = None if server_side else (mask_source or MaskSource())
        self._lock = Semaphore()
        self._error: ProtocolError | None = None
        self.close_sent = False
        self.closed = False
        self.controls: list[Message] | tuple = ()  # the control frames of the last read (a CLOSE last)
        # a plain gevent socket (not TLS, which may hold decrypted bytes that readiness does not
        # report, and whose send waits by itself): readiness tells all, and a send can be tried
        self._plain = self.can_park and not hasattr(sock, "pending")
        self._wait_first = False
        self.reads = 0  # recv calls so far: a reader whose count stands still is idle
        self.sends = 0  # send calls that wrote something: a writer whose count stands still is stuck
        self.stalled_at = -1.0  # when the last write that had to wait for the peer ended
        self.stall_timeout_s = CLOSE_SEND_TIMEOUT_S  # a Close gives up after this long without progress
        self._idle_watcher = None  # set while parked
        self._closed_event: Event | None = None  # made by wait_closed
        self._resumed: Callable[[], None] | None = None  # set by resume() until the first frames arrive
        self._repark = False  # the next read raises Parked at once
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (e.g. a Unix socket in tests)

    # ---- reading (one reader greenlet per connection) ----
    def read(self) -> list[Message]:
        """Block until at least one complete frame arrives; return the data messages.

        The control frames that came with them are in ``controls``, in order;
        a CLOSE is the last and comes after all the data (nothing after it is
        parsed). Pings and pongs may be handled before the data. Raises
        ConnectionLost at EOF and :class:`~iwsproxy.exceptions.ProtocolError`
        on a protocol violation.
        """
        if self._error is not None:
            raise self._error
        if self._repark:
            self._repark = False
            raise Parked()
        while True:
            self.reads += 1
            try:
                if self._prefix is None:
                    if self._wait_first:
                        self._wait_readable()
                    data = self._recv(READ_CHUNK)
                else:
                    data = self._take_prefix()
            except OSError as exc:
                raise ConnectionLost(str(exc) or type(exc).__name__) from exc
            if not data:
                raise ConnectionLost("connection closed without a close frame")
            parser = self._parser
            try:
                events = parser.feed(data)
            except ProtocolError as exc:
                self.controls = parser.controls
                if not exc.events and not self.controls:
                    raise
                self._error = exc  # deliver the good frames first; the next read raises
                return exc.events
            self.controls = controls = parser.controls
            if events or controls:
                if self._resumed is not None:
                    self._first_frames_since_resume(bool(events))
                # a burst read whole (several frames, a short read) leaves nothing behind it: the
                # next read waits for data instead of asking at once and being told EAGAIN (a
                # system call and an exception, about 5% of the proxy's CPU under load)
                self._wait_first = self._plain and len(events) > 1 and len(data) < READ_CHUNK
                return events

    def _first_frames_since_resume(self, data: bool) -> None:
        on_data, self._resumed = self._resumed, None
        if data:
            on_data()
        elif self._plain:  # a TLS socket may hold more than readiness reports: no shortcut
            self._repark = True

    def _wait_readable(self) -> None:
        event = self.sock._read_event  # gevent's read watcher; None once closed (recv then says so)
        if event is not None:
            get_hub().wait(event)

    # ---- parking ----
    @property
    def can_park(self) -> bool:
        """Only a gevent socket's wait can be interrupted or awaited (not a blocking stdlib socket's)."""
        return getattr(self.sock, "_read_event", None) is not None

    def park(self) -> None:
        """Make the reader, if it is blocked waiting for data, raise :class:`Parked` (from any greenlet).

        gevent's ``cancel_wait`` checks in the hub that the wait is still in
        progress, so a reader that has meanwhile got data and is busy elsewhere
        is left alone.
        """
        if not self.closed and self.can_park:
            get_hub().cancel_wait(self.sock._read_event, Parked())

    def resume(self, on_data: Callable[[], None]) -> None:
        """A parked reader runs again (call before its first read): if the first frames it reads
        are control frames only (a keepalive's pong, a ping), its next read raises
        :class:`Parked` at once, without waiting, so it goes back to an idle watcher
        without anyone looking for idle readers; if they bring data, ``on_data()`` is
        called and the reader stays until :meth:`park`."""
        self._resumed = on_data
        self._repark = False

    def call_when_readable(self, callback) -> None:
        """Call ``callback()`` (in the hub) once data or EOF arrives; for a reader that was parked."""
        if self.closed:
            callback()  # the reader finds out at once
            return
        watcher = self._idle_watcher = get_hub().loop.io(self.sock.fileno(), 1)
        watcher.start(self._readable, callback)

    def _readable(self, callback) -> None:
        self.stop_watching()
        callback()

    def stop_watching(self) -> bool:
        """Cancel :meth:`call_when_readable`; True if it was pending."""
        watcher, self._idle_watcher = self._idle_watcher, None
        if watcher is None:
            return False
        watcher.close()
        return True

    def _take_prefix(self) -> bytes:
        prefix, self._prefix = self._prefix, None
        return prefix

    # ---- writing (any greenlet; serialised) ----
    def encode(self, messages: list[Message], ping: bytes | None = None) -> bytes:
        return encode_messages(messages, self._mask, ping)

    def send(self, messages: list[Message], ping: bytes | None = None) -> None:
        """Write data messages (and an optional trailing ping) in one write."""
        if messages or ping is not None:
            self.send_raw(self.encode(messages, ping))

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            if self.close_sent:
                raise ConnectionLost("close already sent")
            try:
                if self._plain:  # try without waiting (usually takes it all): a wait is a stall
                    try:
                        sent = self.sock.send(data, 0, 0.0)
                    except BlockingIOError:
                        sent = 0
                else:
                    sent = self._send_timed(data)
                if sent:
                    self.sends += 1
                if sent < len(data):
                    self._send_rest(memoryview(data)[sent:])
            except OSError as exc:
                raise ConnectionLost(str(exc) or type(exc).__name__) from exc

    def _send_timed(self, data: bytes) -> int:
        """A TLS (or blocking) socket's send, which waits by itself when the peer is slow: a send
        that took long was such a wait."""
        started = monotonic()
        sent = self.sock.send(data)
        if monotonic() - started > _STALL_S:
            self.stalled_at = monotonic()
        return sent

    def _send_rest(self, view: memoryview) -> None:
        """Write the rest of a batch the peer is slow to take, counting each step (not sendall:
        its progress could not be seen, and it costs a getsockopt per call); ``stalled_at`` then
        says when this wait for the peer ended."""
        send = self.sock.send
        try:
            while view:
                sent = send(view)  # waits until the socket takes some
                if sent:
                    self.sends += 1
                    view = view[sent:]
        finally:
            self.stalled_at = monotonic()

    def has_unread(self) -> bool:
        """Bytes from the peer wait in the socket (or in the TLS layer), not yet read by us."""
        try:
            pending = getattr(self.sock, "pending", None)
            if pending is not None and pending():
                return True
            return self._byte_count(termios.FIONREAD) > 0
        except (OSError, ValueError):
            return False  # closed

    @property
    def writing(self) -> bool:
        """A write is under way: seen from another greenlet, it waits for the peer to take bytes."""
        return self._lock.locked()

    def pong(self, payload: bytes) -> None:
        self.send_raw(encode_frame(OP_PONG, payload, mask_source=self._mask))

    def send_close(self, code: int | None, reason: str = "", timeout: float | None = None) -> bool:
        """Send a Close frame once; returns False if one was already sent or the socket failed.

        A peer that has stopped reading (our buffers full, or a write of ours stuck) makes the
        Close wait: once the peer has taken none of our bytes for ``timeout`` seconds (default
        ``stall_timeout_s``) the connection is aborted and this returns False, so that closing
        never waits on a peer for ever. A slow peer that takes bytes is waited for."""
        if timeout is None:
            timeout = self.stall_timeout_s
        if not self._lock.acquire(timeout=timeout):
            self.abort()  # the write holding the lock fails and lets go
            return False
        try:
            if self.close_sent or self.closed:
                return False
            self.close_sent = True
            frame = encode_frame(OP_CLOSE, encode_close_payload(code, reason), mask_source=self._mask)
            try:
                sent = self._send_while_taken(frame, timeout)
            except (OSError, ValueError):  # ValueError: aborted meanwhile (no descriptor left)
                return False
            if not sent:
                self.abort()
            return sent
        finally:
            self._lock.release()

    def _send_while_taken(self, data: bytes, timeout: float) -> bool:
        """Write ``data`` whole, or give up (False) once the peer takes none of our queued bytes
        for ``timeout`` (TLS: once ``timeout`` has passed, its progress cannot be seen)."""
        if not self._plain:
            with Timeout(timeout, False):
                self.sock.sendall(data)
                return True
            return False
        view = memoryview(data)
        queued = self._queued()
        while view:
            try:
                sent = self.sock.send(view, 0, 0.0)
            except BlockingIOError:
                sent = 0
            if sent:
                view = view[sent:]
                queued = self._queued()
                continue
            try:
                wait_write(self.sock.fileno(), timeout, timeout_exc=TimeoutError)
            except TimeoutError:
                still = self._queued()
                if still >= queued:
                    return False
                queued = still
        return True

    def _queued(self) -> int:
        """Bytes in our send queue that the peer has not taken yet."""
        return self._byte_count(termios.TIOCOUTQ)

    def _byte_count(self, request: int) -> int:
        """The kernel's count of bytes waiting in the socket (FIONREAD: to read; TIOCOUTQ: to send)."""
        return _BYTE_COUNT.unpack(fcntl.ioctl(self.sock.fileno(), request, bytes(_BYTE_COUNT.size)))[0]

    @property
    def progress(self) -> tuple[int, int]:
        """Changes whenever a write of ours makes progress: our sends, and the bytes still queued
        for the peer (a Close's wait, or a socket buffer the peer is emptying, shows only there)."""
        try:
            return self.sends, self._queued() if self._plain else -1
        except (OSError, ValueError):
            return self.sends, -1  # closed

    def linger(self, timeout: float) -> None:
        """After the close handshake: end our side of the stream (the peer reads our Close, then
        the end), then read and drop whatever still comes until the peer closes too (or
        ``timeout``). Closing with unread data (a late Pong) would reset the connection, and the
        reset can take with it what is still on its way to the peer: our Close."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            with Timeout(timeout, False):
                while self.sock.recv(READ_CHUNK):
                    pass
        except OSError:
            pass

    def wait_closed(self) -> None:
        """Block until :meth:`abort` has been called."""
        if not self.closed:
            if self._closed_event is None:
                self._closed_event = Event()
            self._closed_event.wait()

    def abort(self) -> None:
        """Drop the connection at once (no close handshake); idempotent."""
        if self.closed:
            return
        self.closed = True
        self.stop_watching()  # before the descriptor closes
        if self._closed_event is not None:
            self._closed_event.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
