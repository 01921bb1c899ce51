"""The data path of a :class:`~iwsproxy.io.pipe.PersistentPipe`: its read loops.

The *client reader* block-reads the client and writes what it read to the backend; one
*backend reader* per backend connection does the reverse. Each hands a whole batch of
messages to the session and performs the send it returns under the write lock of the side it
writes to (:mod:`iwsproxy.io.locks`); control frames go first (a Pong frees buffer room).
Everything else they learn (a peer gone or closed, a backend's Ping) they post to the
supervisor. Flow control: a reader whose peer has left half the buffer cap unacknowledged waits
for that peer's Pong before it hands on more, so TCP holds its own sender back.
"""

from __future__ import annotations

import logging

import gevent
from gevent.event import Event

from ..buffer import Message
from ..exceptions import ProtocolError
from ..frames import OP_PING, OP_PONG, parse_close_payload
from ..session import Session
from .backend import BackendConnection
from .connection import Connection, ConnectionLost
from .events import BackendClosed, BackendLost, BackendPinged, ClientGone, StopAsked
from .locks import WriteLock
from .supervisor import short_id

__all__ = ["Relay", "CLOSE_GRACE_S"]

log = logging.getLogger("iwsproxy.io.pipe")

CLOSE_GRACE_S = 2.0      # how long a close handshake may take before the socket is dropped


class Relay:
    """The read loops' part of :class:`~iwsproxy.io.pipe.PersistentPipe` (a base class of it,
    working on the pipe's attributes)."""

    def _read_client(self, client: Connection) -> None:
        session = self.session
        lock = self._locks.backend
        try:
            while True:
                data = client.read()
                close = None
                for op, payload in client.controls:  # usually none; pongs first: they free buffer space
                    if op == OP_PING:
                        client.pong(payload)
                    elif op == OP_PONG:
                        armed_for = self._timer_fence(session.to_client)
                        if session.client_pong(payload, self.clock()):
                            self.wake()
                        elif self._armed:
                            self._settled(session.to_client, armed_for, 0.0)
                        if self._room_for is not None:
                            self._room.set()
                    else:  # CLOSE, always the last
                        close = payload
                if data:  # handed on as it is
                    self._client_data(data, lock, session)
                if close is not None:
                    self._client_closing(client, close)
                    return
        except ProtocolError as exc:
            self._client_broke_protocol(client, exc)
        except ConnectionLost as exc:
            self._post(ClientGone(client, 1006, str(exc)))

    def _client_data(self, data: list[Message], lock: WriteLock, session: Session) -> None:
        # in turn: a batch an old connection's reader holds while it waits for room goes on before
        # what a new connection (a takeover) reads meanwhile
        with self._to_backend_turn:
            if session.backend_window_full():
                self._wait_for_room("backend", session.backend_window_full)
            with lock:
                self._perform(session.client_messages(data, self.clock()))
        if self._locks.supervisor_waits:
            # a Semaphore lets its releaser take it again before a waiter wakes: without this yield
            # the supervisor could wait for as long as data keeps coming
            gevent.sleep(0)  # ok-sleep: a yield to the waiting supervisor, not a wait
        if self._armed:
            self._check_pong_deadline(session.to_backend)

    def _check_pong_deadline(self, ledger) -> None:
        """Wake the sleeping supervisor if a write started a pong timeout earlier than its wake-up.

        Writes can only make a deadline earlier by sending the first fence after a
        quiet spell (later fences fall due after it), so this wakes it rarely.
        """
        oldest = ledger.oldest_fence_at()
        timeout = self.session.pong_timeout_s
        if oldest is not None and timeout and oldest + timeout < self._armed:
            self._armed = oldest + timeout
            self.wake()

    def _client_closing(self, client: Connection, payload: bytes) -> None:
        try:
            code, reason = parse_close_payload(payload)
        except ProtocolError as exc:
            self._client_broke_protocol(client, exc)
            return
        echoed = client.send_close(code, reason)  # complete the close handshake (echo the code)
        if client is self.client and not self.session.detaches(code) and self._evacuation is None:
            self._closing = True  # the session ends when the supervisor gets to it: not to be rejoined
        self._post(ClientGone(client, code or 1005, reason))
        if echoed:  # the client closed first: its late frames (a Pong) must not reset our reply
            client.linger(CLOSE_GRACE_S)

    def _client_broke_protocol(self, client: Connection, exc: ProtocolError) -> None:
        log.info("pipe %s: client broke the protocol: %s", short_id(self.client_id), exc)
        self.telemetry.client_closed(exc.close_code, "protocol")
        client.send_close(exc.close_code, exc.reason)
        self._post(ClientGone(client, exc.close_code, exc.reason))

    def _read_backend(self, conn: BackendConnection, generation: int) -> None:
        session = self.session
        lock = self._locks.client
        try:
            while True:
                data = conn.read()
                close = None
                for op, payload in conn.controls:  # as above
                    if op == OP_PONG:
                        armed_for = self._timer_fence(session.to_backend)
                        if session.backend_pong(generation, payload, self.clock()):
                            self.wake()
                        elif self._armed:
                            self._settled(session.to_backend, armed_for, session.keepalive_s)
                        if self._room_for is not None:
                            self._room.set()
                    elif op == OP_PING:
                        self._post(BackendPinged(generation, payload))
                    else:
                        close = payload
                if data:
                    self._backend_data(data, lock, session)
                if close is not None:
                    try:
                        code, reason = parse_close_payload(close)
                    except ProtocolError as exc:
                        code, reason = exc.close_code, exc.reason
                    self._post(BackendClosed(generation, code or 1005, reason))
                    return
        except ProtocolError as exc:
            conn.send_close(exc.close_code, exc.reason)
            self._post(BackendLost(generation, f"protocol error: {exc.reason}"))
        except ConnectionLost as exc:
            self._post(BackendLost(generation, str(exc)))

    def _backend_data(self, data: list[Message], lock: WriteLock, session: Session) -> None:
        if session.client_window_full():
            self._wait_for_room("client", session.client_window_full)
        with lock:
            self._perform(session.backend_messages(data, self.clock()))
        if self._locks.supervisor_waits:
            gevent.sleep(0)  # ok-sleep: a yield to the waiting supervisor, as above
        if self._armed:
            self._check_pong_deadline(session.to_client)

    def _wait_for_room(self, peer: str, full) -> None:
        """Hold this reader, and so through TCP its sender, while ``peer`` has left half the buffer
        cap unacknowledged (``full()``): its Pong frees room. The wait shows as a stall of writes
        to ``peer``, so the peer this reader stops reading is not blamed for a Pong it holds up.

        At most one direction waits so: each would wait for a Pong that only the other
        direction's reader reads. A reader of the other direction goes on, and the cap ends the
        session if it overflows, as it would without this wait. (Client readers of one pipe,
        more than one after a takeover, wait in turn: see ``_client_data``.) Every supervisor
        turn (a peer lost, gone, closed) and every Pong wakes the waiter to look again."""
        if self._room_for is not None:
            return
        self._room_for = peer
        if self._room is None:
            self._room = Event()
        try:
            while full() and not self.session.closed:
                conn = self.backend if peer == "backend" else self.client
                if conn is not None:
                    conn.stalled_at = self.clock()
                self._room.clear()
                self._room.wait(self.session.pong_timeout_s or None)
        finally:
            self._room_for = None
            conn = self.backend if peer == "backend" else self.client
            if conn is not None:
                conn.stalled_at = self.clock()

    def _crashed(self, greenlet) -> None:
        """A reader crashed: the supervisor ends the session (1011)."""
        log.error("pipe %s: greenlet crashed", short_id(self.client_id), exc_info=greenlet.exc_info)
        self._post(StopAsked(1011, "internal error"))
