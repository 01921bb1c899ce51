"""PersistentPipe: one client session, driven through its :class:`~iwsproxy.session.Session`.

Greenlets of one pipe (all kept in the pipe's ``Group``):

* the *supervisor* is the greenlet that called :meth:`PersistentPipe.run` (the
  request's greenlet): it reacts to events (backend lost, client gone, wake-ups),
  runs the reconnect loop with backoff and performs deadline actions;
* the *client reader* block-reads the client and writes to the backend;
* one *backend reader* per backend connection block-reads the backend and writes
  to the client.

Every session call that leads to a backend write happens under
``_backend_lock``, together with that write, so the order the session decided
is the order on the wire. The backend reader never takes that lock (a writer
blocked on a backend that is itself blocked writing to us would deadlock); it
only posts events.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.pool import Group
from gevent.queue import Empty, Queue

from ..backoff import backoff
from ..buffer import Message
from ..exceptions import BackendError, BackendRejected, NoBackendAvailable, ProtocolError
from ..frames import OP_CLOSE, OP_PING, OP_PONG, parse_close_payload
from ..session import (AbandonBackend, CloseBackend, CloseClient, SendToBackend, Session, State,
                       encode_fence)
from .backend import BackendConnection, ClientOffer, connect_backend
from .connection import Connection, ConnectionLost

if TYPE_CHECKING:
    from .manager import PipeManager

__all__ = ["PersistentPipe"]

log = logging.getLogger(__name__)
monotonic = time.monotonic

CLOSE_GRACE_S = 2.0      # how long a close handshake may take before the socket is dropped
# a backend close with one of these codes ends the client's session (the application said so);
# any other close, error or EOF is a failover
_ENDS_SESSION = frozenset({1000}) | frozenset(range(4000, 5000))


def short_id(client_id: str) -> str:
    """Client ids are credentials once sessions can be resumed: log only a prefix."""
    return client_id[:8]


class PersistentPipe:
    """One client's session across any number of backend connections."""

    def __init__(self, manager: "PipeManager", client_id: str, offer: ClientOffer):
        settings = manager.settings
        self.manager = manager
        self.client_id = client_id
        self.offer = offer
        self.opened_at = monotonic()
        self.session = Session(buffer_limit_bytes=settings.buffer_limit_bytes,
                               replay=settings.delivery == "at-least-once", now=self.opened_at,
                               reconnect_deadline_s=settings.reconnect_deadline_s,
                               pong_timeout_s=settings.pong_timeout_s)
        self.client: Connection | None = None
        self.backend: BackendConnection | None = None
        self.subprotocol: str | None = None
        self.reconnects = 0          # backend connections made after the first
        self.messages_to_backend = 0
        self.messages_to_client = 0
        self.last_move_ms: float | None = None  # how long the last backend switch took
        self._backend_lock = Semaphore()
        self._events: Queue = Queue()
        self._group = Group()
        self._stopped = Event()
        self._retry_at: float | None = None
        self._delays = None
        self._first_connect = True
        self._lost_from: str | None = None
        self._lost_cause = ""
        self._seen_state: str | None = None    # last state and buffer size reported to metrics
        self._seen_buffered = 0

    # ---- information ----
    @property
    def state(self) -> State:
        return self.session.state

    @property
    def backend_url(self) -> str | None:
        return self.backend.url if self.backend is not None else None

    def info(self) -> dict:
        return {"client": short_id(self.client_id), "state": self.session.state.value,
                "backend": self.backend_url, "buffered_bytes": self.session.buffer.total_bytes,
                "failovers": self.session.failovers, "replayed": self.session.replayed_total,
                "last_move_ms": self.last_move_ms,
                "age_s": round(monotonic() - self.opened_at, 3)}

    # ---- life cycle ----
    def connect_first(self, *, allow_waiting: bool) -> None:
        """Connect the first backend before the client's handshake is answered.

        Raises :class:`BackendRejected` (the client gets that status) or
        :class:`NoBackendAvailable` (503), unless ``allow_waiting`` lets the pipe
        start without a backend and buffer until one is free.
        """
        tried = self._connect_round(monotonic())
        if self.session.state is State.CONNECTED:
            return
        if not allow_waiting:
            raise NoBackendAvailable(tried)
        self.manager.wait_for_backend(self)

    def run(self, client: Connection) -> None:
        """Serve the pipe until it ends; blocks (this greenlet becomes the supervisor)."""
        self.client = client
        log.info("pipe %s open: backend=%s subprotocol=%s", short_id(self.client_id), self.backend_url,
                 self.subprotocol)
        reader = self._group.spawn(self._read_client)
        reader.link_exception(self._crashed)
        if self.backend is not None:
            self._spawn_backend_reader(self.backend, self.session.generation)
        self._observe()
        try:
            self._supervise()
        finally:
            self._teardown()
            self._observe(final=True)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the pipe has torn down; False on timeout."""
        return self._stopped.wait(timeout)

    def stop(self, code: int = 1001, reason: str = "proxy shutting down") -> None:
        """Ask the pipe to close its client with ``code`` (from any greenlet)."""
        self._events.put(("stop", code, reason))

    def drain(self, url: str) -> None:
        """Move this pipe off ``url`` without loss or duplicates (from any greenlet)."""
        self._events.put(("drain", url))

    def wake(self) -> None:
        """Something changed (pool, fence due): let the supervisor look again."""
        self._events.put(("wake",))

    # ---- supervisor ----
    def _supervise(self) -> None:
        session = self.session
        if session.needs_backend:
            self._retry_at = monotonic()
        while not session.closed:
            now = monotonic()
            if session.needs_backend and self._retry_at is not None and now >= self._retry_at:
                self._connect_round(now)
                if session.needs_backend and not session.closed:
                    self._retry_at = monotonic() + next(self._delays_iter())
            deadlines = [d for d in (session.next_deadline(), self._retry_at if session.needs_backend else None)
                         if d is not None]
            timeout = max(0.0, min(deadlines) - monotonic()) if deadlines else None
            try:
                event = self._events.get(timeout=timeout)
            except Empty:
                event = None
            if event is not None:
                self._handle(event)
            if not session.closed:
                with self._backend_lock:
                    self._perform(session.poll(monotonic()))
            self._observe()

    def _observe(self, final: bool = False) -> None:
        """Report state and buffer changes to metrics (once per supervisor turn, not per message)."""
        metrics = self.manager.metrics
        state = None if final else self.session.state.value
        if state != self._seen_state:
            metrics.pipe_state(self._seen_state, state)
            self._seen_state = state
        buffered = 0 if final else self.session.buffer.total_bytes
        if buffered != self._seen_buffered:
            metrics.buffered_bytes(buffered - self._seen_buffered)
            self._seen_buffered = buffered

    def _delays_iter(self):
        if self._delays is None:
            s = self.manager.settings
            self._delays = backoff(initial_s=s.backoff_initial_s, max_s=s.backoff_max_s)
            next(self._delays)  # the immediate first retry was the round just made
        return self._delays

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        session = self.session
        if kind == "backend_lost":
            _, generation, cause = event
            self._lose_backend(generation, cause)
        elif kind == "backend_closed":
            _, generation, code, reason = event
            if generation != session.generation:
                return
            if session.state is State.DRAINING:
                url = self.backend_url
                session.backend_drained(generation, monotonic())
                self._release_backend(failed=False)
                self._lost_from, self._lost_cause = url, "drain"
                self._delays = None
                self._retry_at = monotonic()
            elif code in _ENDS_SESSION:
                log.info("pipe %s: backend %s ended the session (%s %s)", short_id(self.client_id),
                         self.backend_url, code, reason)
                self._release_backend(failed=False)
                self._perform(session.backend_ended_session(code, reason))
            else:
                self._lose_backend(generation, f"backend closed with {code} {reason}".rstrip())
        elif kind == "backend_ping":
            _, generation, payload = event
            if generation == session.generation and self.backend is not None:
                try:
                    with self._backend_lock:
                        self.backend.pong(payload)
                except ConnectionLost as exc:
                    self._lose_backend(generation, f"write failed: {exc}")
        elif kind == "client_gone":
            _, code, reason = event
            log.info("pipe %s: client closed (%s %s)", short_id(self.client_id), code, reason)
            with self._backend_lock:
                self._perform(session.client_closed())
        elif kind == "drain":
            if self.backend_url == event[1] and session.state is State.CONNECTED:
                log.info("pipe %s: draining backend %s", short_id(self.client_id), event[1])
                with self._backend_lock:
                    self._perform(session.drain(monotonic()))
        elif kind == "stop":
            _, code, reason = event
            with self._backend_lock:
                self._perform(session.close(code, reason))
        elif kind == "wake" and session.needs_backend:
            self._retry_at = monotonic()

    def _lose_backend(self, generation: int, cause: str) -> None:
        if generation != self.session.generation or self.session.state not in (State.CONNECTED, State.DRAINING):
            return
        conn = self.backend
        if conn is not None:
            conn.abort()  # unblocks a writer stuck on a dead peer before we take the lock
        with self._backend_lock:
            self.session.backend_lost(generation, monotonic())
        self._lost_from, self._lost_cause = (conn.url if conn else None), cause
        log.info("pipe %s: backend %s lost: %s", short_id(self.client_id), self._lost_from, cause)
        self._release_backend(failed=True, cause=cause)
        self._delays = None
        self._retry_at = monotonic()

    def _release_backend(self, *, failed: bool, cause: str = "") -> None:
        conn, self.backend = self.backend, None
        if conn is None:
            return
        self.manager.release_backend(conn.url, failed=failed, cause=cause)

    def _connect_round(self, now: float) -> list:
        """Try each usable backend once; returns [(url, error)] for those that failed."""
        manager, session = self.manager, self.session
        exclude = {self._lost_from} if self._lost_from and manager.pool_size() > 1 else set()
        tried: list = []
        while session.needs_backend and not session.closed:
            url = manager.acquire_backend(exclude)
            if url is None:
                break
            exclude.add(url)
            try:
                conn = connect_backend(url, self.offer,
                                       reconnects=0 if self._first_connect else self.reconnects + 1,
                                       timeout_s=manager.settings.connect_timeout_s,
                                       max_message_size=manager.settings.max_message_size_bytes,
                                       require_subprotocol=None if self._first_connect else self.subprotocol)
            except BackendRejected as exc:
                manager.release_backend(url, failed=not self._first_connect, cause=str(exc))
                if self._first_connect and 400 <= exc.status < 500:
                    raise  # the backend refused this client: it gets the same answer
                tried.append((url, exc))
                continue
            except BackendError as exc:
                manager.release_backend(url, failed=True, cause=str(exc))
                tried.append((url, exc))
                log.warning("pipe %s: backend %s failed: %s", short_id(self.client_id), url, exc.detail)
                continue
            if session.closed:
                conn.abort()
                manager.release_backend(url, failed=False)
                break
            self._attach(conn)
            return tried
        if tried and session.needs_backend and not self._first_connect:
            log.warning("pipe %s: no backend reachable (%d tried)", short_id(self.client_id), len(tried))
        if session.needs_backend:
            manager.wait_for_backend(self)
        return tried

    def _attach(self, conn: BackendConnection) -> None:
        manager, session = self.manager, self.session
        manager.backend_succeeded(conn.url)
        manager.stop_waiting(self)
        if self._first_connect:
            self.subprotocol = conn.subprotocol
        else:
            self.reconnects += 1
        was_first = self._first_connect and self.client is None
        self._first_connect = False
        with self._backend_lock:
            self.backend = conn
            generation, actions = session.backend_connected(monotonic())
            self._perform(actions)
        report = session.last_failover
        if report is not None and session.failovers == self.reconnects and not was_first:
            log.info("pipe %s: failover %s -> %s after %s: %.1f ms, %d replayed, %d messages / %d bytes flushed",
                     short_id(self.client_id), self._lost_from, conn.url, self._lost_cause or "waiting",
                     report.duration_s * 1000, report.replayed, report.flushed_messages, report.flushed_bytes)
            self.last_move_ms = round(report.duration_s * 1000, 1)
            manager.record_failover(report)
        if self.client is not None and self.backend is conn:
            self._spawn_backend_reader(conn, generation)

    def _spawn_backend_reader(self, conn: BackendConnection, generation: int) -> None:
        reader = self._group.spawn(self._read_backend, conn, generation)
        reader.link_exception(self._crashed)

    # ---- actions ----
    def _perform(self, actions: list) -> None:
        """Perform session actions in order; backend writes must hold ``_backend_lock``."""
        for action in actions:
            if type(action) is SendToBackend:
                backend = self.backend
                if backend is None:
                    continue
                messages = action.messages
                try:
                    backend.send(messages, None if action.fence is None else encode_fence(action.fence))
                except ConnectionLost as exc:
                    self._events.put(("backend_lost", self.session.generation, f"write failed: {exc}"))
                    return
                if messages:
                    self.messages_to_backend += len(messages)
                    self.manager.metrics.messages("to_backend", len(messages), sum(len(m[1]) for m in messages))
            elif type(action) is CloseClient:
                log.info("pipe %s: closing client with %d %s", short_id(self.client_id), action.code, action.reason)
                self.manager.record_client_closed(action.code, action.reason)
                if self.client is not None:
                    self.client.send_close(action.code, action.reason)
            elif type(action) is CloseBackend:
                if self.backend is not None:
                    self.backend.send_close(action.code, action.reason)
            elif type(action) is AbandonBackend:
                log.warning("pipe %s: abandoning backend %s: %s", short_id(self.client_id), self.backend_url,
                            action.reason)
                conn = self.backend
                if conn is not None:
                    conn.abort()
                self._lost_from, self._lost_cause = (conn.url if conn else None), action.reason
                self._release_backend(failed=True, cause=action.reason)
                self._delays = None
                self._retry_at = monotonic()

    # ---- readers ----
    def _read_client(self) -> None:
        client, session = self.client, self.session
        lock = self._backend_lock
        try:
            while True:
                events = client.read()
                data: list[Message] = []
                for op, payload in events:
                    if op < OP_CLOSE:
                        data.append((op, payload))
                    elif op == OP_PING:
                        client.pong(payload)
                    elif op == OP_CLOSE:
                        if data:
                            self._client_data(data, lock, session)
                        self._client_closing(payload)
                        return
                    # pongs from the client are not needed yet
                if data:
                    self._client_data(data, lock, session)
        except ProtocolError as exc:
            client.send_close(exc.close_code, exc.reason)
            self._events.put(("client_gone", exc.close_code, exc.reason))
        except ConnectionLost as exc:
            self._events.put(("client_gone", 1006, str(exc)))

    def _client_data(self, data: list[Message], lock: Semaphore, session: Session) -> None:
        with lock:
            self._perform(session.client_messages(data, monotonic()))

    def _client_closing(self, payload: bytes) -> None:
        try:
            code, reason = parse_close_payload(payload)
        except ProtocolError as exc:
            self.client.send_close(exc.close_code, exc.reason)
            self._events.put(("client_gone", exc.close_code, exc.reason))
            return
        self.client.send_close(code, reason)  # complete the close handshake (echo the code)
        self._events.put(("client_gone", code, reason))

    def _read_backend(self, conn: BackendConnection, generation: int) -> None:
        client, session = self.client, self.session
        try:
            while True:
                events = conn.read()
                data: list[Message] = []
                for op, payload in events:
                    if op < OP_CLOSE:
                        data.append((op, payload))
                    elif op == OP_PONG:
                        if session.backend_pong(generation, payload, monotonic()):
                            self.wake()
                    elif op == OP_PING:
                        self._events.put(("backend_ping", generation, payload))
                    elif op == OP_CLOSE:
                        if data:
                            self._to_client(client, data)
                        try:
                            code, reason = parse_close_payload(payload)
                        except ProtocolError as exc:
                            code, reason = exc.close_code, exc.reason
                        self._events.put(("backend_closed", generation, code or 1005, reason))
                        return
                if data:
                    self._to_client(client, data)
        except ProtocolError as exc:
            conn.send_close(exc.close_code, exc.reason)
            self._events.put(("backend_lost", generation, f"protocol error: {exc.reason}"))
        except ConnectionLost as exc:
            self._events.put(("backend_lost", generation, str(exc)))
        except _ClientWriteFailed as exc:
            self._events.put(("client_gone", 1006, str(exc)))

    def _to_client(self, client: Connection, data: list[Message]) -> None:
        try:
            client.send(data)
        except ConnectionLost as exc:
            raise _ClientWriteFailed(str(exc)) from exc
        self.messages_to_client += len(data)
        self.manager.metrics.messages("to_client", len(data), sum(len(m[1]) for m in data))

    def _crashed(self, greenlet) -> None:
        log.error("pipe %s: greenlet crashed", short_id(self.client_id), exc_info=greenlet.exc_info)
        self._events.put(("stop", 1011, "internal error"))

    # ---- teardown ----
    def _teardown(self) -> None:
        """Finish both close handshakes briefly, then drop sockets and greenlets; always runs."""
        current = gevent.getcurrent()
        others = [g for g in list(self._group) if g is not current]
        if others:
            gevent.joinall(others, timeout=CLOSE_GRACE_S)
        for conn in (self.client, self.backend):
            if conn is not None:
                conn.abort()
        self._group.kill(timeout=CLOSE_GRACE_S)
        self._release_backend(failed=False)
        self.manager.stop_waiting(self)
        self._stopped.set()
        log.info("pipe %s closed: %s", short_id(self.client_id),
                 self.session.close_reason or "client closed")


class _ClientWriteFailed(Exception):
    pass
