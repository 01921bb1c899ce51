"""PersistentPipe: one client session, driven through its :class:`~iwsproxy.session.Session`.

The session decides; the pipe feeds it facts and performs what it returns. A pipe runs in
greenlets of its own, and only while they have work (the request that opened it hands the
client socket over and ends):

* the *supervisor* (:mod:`iwsproxy.io.supervisor`) takes mailbox events
  (:mod:`iwsproxy.io.events`), makes the connect rounds the session asks for
  (:mod:`iwsproxy.io.connect`) and acts on deadlines;
* the *client reader* and one *backend reader* per backend connection
  (:mod:`iwsproxy.io.relay`) carry the data, each in a :class:`~iwsproxy.io.readers.Reader`.

After ``park_after_s`` without work each of them is given up: the supervisor hands over to a
timer, a reader is parked and an idle watcher spawns a new one when data arrives. An idle pipe
is objects and watchers, no greenlet (a blocked greenlet costs about 8 KiB).
``park_after_s = 0`` keeps all three for the pipe's life. Every greenlet of a pipe is in its
group, which teardown joins, then kills.

One concurrency rule, stated and enforced in :mod:`iwsproxy.io.locks`: an action the session
returns for one side is performed only by a greenlet holding that side's write lock; others
hand it to the supervisor.

A client that vanishes without a normal close is let go while the pipe lives on, detached; a
new connection with the same id is handed to the pipe (:meth:`PersistentPipe.attach`) and gets
a client reader of its own. The pipe depends only on narrow interfaces
(:mod:`iwsproxy.io.ports`), so a test can build one without a manager.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent
from gevent import getcurrent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.pool import Group

from ..exceptions import NoBackendAvailable
from ..pool import Admin, Backend
from ..session import (AbandonBackend, CloseBackend, CloseClient, ConnectBackend, RecordFailover, ReleaseBackend,
                       SendToBackend, SendToClient, Session, State, encode_fence)
from .backend import OFFERED, BackendConnection, ClientOffer
from .connect import connect_round
from .connection import CLOSE_SEND_TIMEOUT_S, Connection, ConnectionLost
from .events import (RESCHEDULED, WOKEN, BackendLost, ClientArrived, ClientGone, DrainAsked, EvacuateAsked, Mailbox,
                     PerformAsked, StopAsked)
from .locks import WriteLocks
from .moving import Movable
from .ports import BackendLeases, BackendOptions, Telemetry
from .readers import Reader
from .relay import CLOSE_GRACE_S, Relay
from .supervisor import CLOSE_TAKEN_OVER, Supervisor, short_id

if TYPE_CHECKING:
    from ..buffer import Budget
    from ..settings import Settings

__all__ = ["PersistentPipe", "session_settings", "short_id", "CLOSE_TAKEN_OVER"]

log = logging.getLogger(__name__)


def session_settings(settings: "Settings") -> dict:
    """The keyword settings of a pipe's :class:`~iwsproxy.session.Session` under ``settings``
    (for a new session, and for one restored from a snapshot in this process)."""
    return dict(buffer_limit_bytes=settings.buffer_limit_bytes, replay=settings.delivery == "at-least-once",
                reconnect_deadline_s=settings.reconnect_deadline_s, pong_timeout_s=settings.pong_timeout_s,
                keepalive_s=settings.keepalive_s, resume_grace_s=settings.resume_grace_s,
                idle_timeout_s=settings.idle_timeout_s, backoff_initial_s=settings.backoff_initial_s,
                backoff_max_s=settings.backoff_max_s)


class PersistentPipe(Supervisor, Relay, Movable):
    """One client's session across any number of backend connections."""

    def __init__(self, client_id: str, offer: ClientOffer, *, settings: "Settings", leases: BackendLeases,
                 telemetry: Telemetry, budget: "Budget | None" = None,
                 backend_options: BackendOptions = BackendOptions(), on_ended=None,
                 supervisors: Group | None = None, clock=time.monotonic, session: Session | None = None):
        """A pipe for ``client_id``, whose backends see ``offer``; it leases backends from
        ``leases``, reports to ``telemetry``, charges its buffers to ``budget``, runs its
        supervisor in ``supervisors`` (the owner's group, which its shutdown joins) and calls
        ``on_ended(pipe)`` once it has torn down. Every time the session is given comes from
        ``clock`` (``time.monotonic``; a test may pass a clock it controls, then wake the pipe).
        ``session``: a session restored from a snapshot, on ``clock``'s time, its bytes already
        charged to ``budget`` (default: a new one made from ``settings``, see
        :func:`session_settings`); such a pipe is started with :meth:`start_detached`."""
        self.clock = clock
        self.settings = settings
        self.leases = leases
        self.telemetry = telemetry
        self.backend_options = backend_options
        self._on_ended = on_ended
        self.client_id = client_id
        self.offer = offer
        self.opened_at = self.clock()
        if session is None:
            session = Session(**session_settings(settings), now=self.opened_at, budget=budget)
        self.session = session
        self.client: Connection | None = None   # None while detached
        self._client_readers: dict[Connection, Reader] = {}  # every client connection the pipe holds
        self._backend_reader: Reader | None = None
        self._park_after = settings.park_after_s
        # a Close waits for a peer that takes bytes, and gives up on one that takes none for this long
        self._stall_timeout_s = max(settings.pong_timeout_s, CLOSE_SEND_TIMEOUT_S)
        self._park_at: float | None = None    # when the supervisor next looks for idle readers to park
        self.backend: BackendConnection | None = None
        self._lease: Backend | None = None    # the pool's backend that self.backend counts against
        self.subprotocol: str | None = None
        self._locks = WriteLocks(settings.pong_timeout_s)
        self._running = False
        self._to_backend_turn = Semaphore()   # client readers (more than one after a takeover) in turn
        self._room_for: str | None = None     # the peer whose acknowledgements a reader waits for
        self._room: Event | None = None       # set when they may have come (made by the first wait)
        self._closing = False                 # the client closed: a reconnect with its id is a new session
        self._moved = False                   # handed to another process (see Movable): it ends here quietly
        self._events = Mailbox()
        self._supervisor: gevent.Greenlet | None = None
        self._timer = None                    # the supervisor's next deadline while it is not running
        self._group = Group()                 # its readers and lingering closes
        self._supervisors = supervisors if supervisors is not None else Group()
        self._stopped = Event()
        self._armed = 0.0                     # the deadline the supervisor (or its timer) waits for; 0: awake
        self._seen_state: str | None = None    # last state and buffer size reported to metrics
        self._seen_buffered = 0
        self._evacuation = None               # the EvacuateAsked under way
        self.evacuated = False                # the session left this process as a snapshot

    # ---- information ----
    @property
    def state(self) -> State:
        return self.session.state

    @property
    def backend_url(self) -> str | None:
        return self.backend.url if self.backend is not None else None

    @property
    def last_move_ms(self) -> float | None:
        """How long the last completed backend switch took."""
        report = self.session.last_failover
        return None if report is None else round(report.duration_s * 1000, 1)

    def info(self) -> dict:
        session = self.session
        state = session.state.value if session.client_attached or session.closed else "detached"
        return {"client": short_id(self.client_id), "state": state, "backend_state": session.state.value,
                "backend": self.backend_url, "buffered_bytes": session.to_backend.buffer.total_bytes,
                "buffered_to_client_bytes": session.to_client.buffer.total_bytes, "resumes": session.resumes,
                "failovers": session.failovers, "replayed": session.replayed_total,
                "last_move_ms": self.last_move_ms,
                "age_s": round(self.clock() - self.opened_at, 3)}

    # ---- life cycle ----
    def connect_first(self, *, allow_waiting: bool) -> None:
        """Connect the first backend before the client's handshake is answered.

        Raises :class:`BackendRejected` (the client gets that status) or
        :class:`NoBackendAvailable` (503), unless ``allow_waiting`` lets the pipe
        start without a backend and buffer until one is free.
        """
        tried = self._connect_round(self.session.connect_due(self.clock()))
        if self.session.state is State.CONNECTED:
            return
        if not allow_waiting:
            raise NoBackendAvailable(tried)
        self.leases.wait_for_backend(self)

    def start(self, client: Connection) -> None:
        """Serve the pipe with its first client connection; returns at once (the pipe owns ``client``).

        When the pipe ends it calls ``on_ended(pipe)``.
        """
        self._running = True
        self._use_client(client)
        log.info("pipe %s open: backend=%s subprotocol=%s", short_id(self.client_id), self.backend_url,
                 self.subprotocol)
        if self.backend is not None:
            self._spawn_backend_reader(self.backend, self.session.generation)
        if self.session.needs_backend:  # the first backend could not be had: the pipe started waiting
            self.session.pool_changed(self.clock())
        if self._park_after:
            self._park_at = self.clock() + self._park_after
        self._observe()
        self._post(RESCHEDULED)

    def start_detached(self) -> None:
        """Serve a session that has no connection on either side (one restored from a snapshot,
        its client detached, its backend side needing a backend); returns at once.

        The pipe connects a backend when its session asks (replaying what the last backend had not
        acknowledged, then what was buffered for it), holds what the backend sends, and waits
        for its client (:meth:`attach`) until the resume grace ends the session. When the pipe
        ends it calls ``on_ended(pipe)``.
        """
        session = self.session
        if session.closed or session.client_attached or session.has_backend:
            raise ValueError(f"a detached start needs a detached session without a backend, not "
                             f"{session.state.value}/{session.client_side.value}")
        self._running = True
        log.info("pipe %s open, detached: subprotocol=%s, %d bytes held for the backend, %d for the client",
                 short_id(self.client_id), self.subprotocol, session.to_backend.buffer.total_bytes,
                 session.to_client.buffer.total_bytes)
        if self._park_after:
            self._park_at = self.clock() + self._park_after
        self._observe()
        self._post(RESCHEDULED)

    def attach(self, client: Connection) -> None:
        """Give the pipe a new client connection (resume or takeover); the pipe owns it from here."""
        if self._stopped.is_set():
            client.abort()
            return
        old = self.client
        if old is not None and old.writing:
            # a write to the old connection waits for it to take bytes (greenlets switch only while
            # waiting): no Close could get through soon, and the supervisor may be waiting for
            # that write. The old connection is dropped now; what it did not acknowledge goes to
            # the new one.
            old.abort()
        self._post(ClientArrived(client))

    @property
    def running(self) -> bool:
        """Serving a client connection (False while the first one waits for its backend)."""
        return self._running

    @property
    def ending(self) -> bool:
        """The session is over; the pipe is tearing down or has."""
        return self._closing or self._moved or self.session.closed or self._stopped.is_set()

    @property
    def client_attached(self) -> bool:
        return self.session.client_attached and not self.session.closed

    def _use_client(self, client: Connection) -> None:
        client.stall_timeout_s = self._stall_timeout_s
        client.clock = self.clock  # its stalls are compared with the session's times
        self.client = client
        self._client_readers[client] = Reader(self, client, self._read_client)

    def _let_go(self, client: Connection, code: int | None = None, reason: str = "") -> None:
        """Stop using a client connection, closing it with ``code`` if given.

        After a Close the connection lingers (up to CLOSE_GRACE_S) so that the
        client's Close reply completes the handshake.
        """
        if self.client is client:
            self.client = None
        reader = self._client_readers.get(client)
        if code is not None and client.send_close(code, reason) and reader is not None and not reader.finished:
            self._group.spawn(self._linger, client, reader)
            return
        self._release_client(client)

    def _linger(self, client: Connection, reader: "Reader") -> None:
        reader.wait_finished(CLOSE_GRACE_S)  # the reader ends when the client's Close reply arrives
        self._release_client(client)

    def _release_client(self, client: Connection) -> None:
        client.abort()
        self._client_readers.pop(client, None)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the pipe has torn down; False on timeout."""
        return self._stopped.wait(timeout)

    def stop(self, code: int = 1001, reason: str = "proxy shutting down") -> None:
        """Ask the pipe to close its client with ``code`` (from any greenlet)."""
        self._post(StopAsked(code, reason))

    def evacuate(self, code: int, reason: str, timeout_s: float, on_done) -> None:
        """Hand the session over to another process (from any greenlet; a pipe that has ended, or
        evacuates already, ignores it).

        The backend gets Close 1001 and the client Close ``code``; what either sends until its
        Close reply is kept (the backend's reply proves it read everything, so nothing is
        replayed to the next one; what the client had not acknowledged is delivered again when
        it resumes). No backend is connected meanwhile. After both replies, or ``timeout_s``
        (then a backend without a reply counts as lost, its unacknowledged messages replayed),
        ``on_done(pipe, snapshot)`` gets the session detached as :func:`~iwsproxy.io.carry.export_pipe`
        writes it, with ``evacuated`` set, and the pipe ends, its buffers given back."""
        self._post(EvacuateAsked(code, reason, self.clock() + timeout_s, on_done))

    def drain(self, url: str) -> None:
        """Move this pipe off ``url`` without loss or duplicates (from any greenlet)."""
        self._post(DrainAsked(url))

    def wake(self) -> None:
        """Something changed (pool, fence due): let the supervisor look again."""
        self._post(WOKEN)

    def _readers(self) -> list["Reader"]:
        readers = list(self._client_readers.values())
        if self._backend_reader is not None:
            readers.append(self._backend_reader)
        return readers

    def _park_idle_readers(self, now: float) -> None:
        """Park the readers that have not read since the last look (one ``park_after_s`` ago)."""
        running = False
        for reader in self._readers():
            if reader.greenlet is None:
                continue
            running = True
            reads = reader.conn.reads
            if reads == reader.reads_seen:
                reader.park()
            reader.reads_seen = reads
        self._park_at = now + self._park_after if running else None

    def _reader_unparked(self) -> None:
        """A reader brought back from parking got data: look again in ``park_after_s``."""
        if self._park_after and self._park_at is None:
            self._park_at = self.clock() + self._park_after
            if self._park_at < self._armed:  # the supervisor sleeps past it
                self._post(RESCHEDULED)

    def _observe(self, final: bool = False) -> None:
        """Report state and buffer changes to metrics (once per supervisor turn, not per message)."""
        metrics, session = self.telemetry.metrics, self.session
        if final:
            state = None
        else:  # a detached pipe keeps its backend state, but is counted as detached
            state = "detached" if not session.client_attached and not session.closed else session.state.value
        if state != self._seen_state:
            metrics.pipe_state(self._seen_state, state)
            self._seen_state = state
        buffered = 0 if final else session.buffer.total_bytes
        if buffered != self._seen_buffered:
            metrics.buffered_bytes(buffered - self._seen_buffered)
            self._seen_buffered = buffered

    def _release_backend(self, *, failed: bool, cause: str = "") -> None:
        """Stop using the backend connection: close its socket and give its slot back to the pool."""
        conn, self.backend = self.backend, None
        lease, self._lease = self._lease, None
        if conn is not None:
            conn.abort()
        if lease is not None:
            self.leases.release_backend(lease, failed=failed, cause=cause)

    def abandon(self) -> None:
        """Give back the backend of a pipe that will never start (its client was not answered);
        whoever waits for it to close (a shutdown) need not wait any longer."""
        self._release_backend(failed=False)
        self._stopped.set()

    def _connect_round(self, round_: ConnectBackend | None) -> list:
        """Make the connect round the session asked for; returns [(url, error)] for the backends
        that failed."""
        if round_ is None:
            return []
        self.leases.stop_waiting(self)  # the round's own failed leases must not wake it again
        conn, lease, tried = connect_round(
            round_, self.session, self.offer, leases=self.leases, settings=self.settings,
            options=self.backend_options, first=self.session.generation == 0, name=short_id(self.client_id),
            subprotocol=self.subprotocol if self._running else OFFERED)  # settled once the client is answered
        if conn is not None:
            self._attach(conn, lease)
        elif self.session.needs_backend:
            self.session.connect_failed(self.clock())
            self.leases.wait_for_backend(self)
        return tried

    def _attach(self, conn: BackendConnection, lease: Backend) -> None:
        session = self.session
        self.leases.backend_succeeded(conn.url)
        self.leases.stop_waiting(self)
        if not self._running:  # the client is answered with this backend's choice
            self.subprotocol = conn.subprotocol
        conn.stall_timeout_s = self._stall_timeout_s
        conn.clock = self.clock  # its stalls are compared with the session's times
        with self._holding(backend=True):
            self.backend, self._lease = conn, lease
            generation, actions = session.backend_connected(self.clock(), conn.url)
            if self._running:
                # reading before the flush: a backend that answers what it reads (an echo) would
                # otherwise stop reading a flush larger than the sockets hold, and the flush would wait for it
                self._spawn_backend_reader(conn, generation)
            self._perform(actions)
        if lease.admin is Admin.DRAINING:  # drained while this handshake was under way: move on
            self.drain(conn.url)

    def _spawn_backend_reader(self, conn: BackendConnection, generation: int) -> None:
        self._backend_reader = Reader(self, conn, self._read_backend, generation)

    # ---- actions ----
    def _perform(self, actions: list) -> None:
        """Perform session actions in order, under the pipe's rule (:mod:`iwsproxy.io.locks`):
        an action for a side whose write lock the calling greenlet does not hold is handed to
        the supervisor, which performs it under that lock, after the rest.

        After a failed write to one side (its loss is reported) the later writes to that side
        are skipped; the rest is still performed (a fence for the other side, a Close)."""
        backend_ok = client_ok = True
        locks, here = self._locks, getcurrent()
        later = None
        for action in actions:
            side = action.side
            if side is not None and (locks.backend if side == "backend" else locks.client).owner is not here:
                if later is None:
                    later = []
                later.append(action)
                continue
            if type(action) is SendToBackend:
                if backend_ok:
                    backend_ok = self._send(self.backend, action, "to_backend")
            elif type(action) is SendToClient:
                if client_ok:
                    client_ok = self._send(self.client, action, "to_client")
            elif type(action) is CloseClient:
                log.info("pipe %s: closing client with %d %s", short_id(self.client_id), action.code, action.reason)
                self.telemetry.client_closed(action.code, self.session.end_cause)
                if self.client is not None:
                    self.client.send_close(action.code, action.reason)
            elif type(action) is CloseBackend:
                if self.backend is not None:
                    self.backend.send_close(action.code, action.reason)
            elif type(action) is AbandonBackend:
                log.warning("pipe %s: backend %s lost: %s", short_id(self.client_id), self.backend_url,
                            action.reason)
                self._release_backend(failed=True, cause=action.reason)
            elif type(action) is ReleaseBackend:
                log.info("pipe %s: backend %s %s", short_id(self.client_id), self.backend_url, action.reason)
                self._release_backend(failed=False)
            elif type(action) is RecordFailover:
                report = action.report
                log.info("pipe %s: failover %s -> %s after %s: %.1f ms, %d replayed, %d messages / %d bytes "
                         "flushed", short_id(self.client_id), report.from_url, report.to_url, report.cause,
                         report.duration_s * 1000, report.replayed, report.flushed_messages, report.flushed_bytes)
                self.telemetry.failover(report)
        if later:
            self._post(PerformAsked(tuple(later)))

    def _send(self, conn: Connection | None, action: SendToBackend | SendToClient, direction: str) -> bool:
        """Write one send action; False (with the loss reported) if the connection failed."""
        if conn is None:
            return True
        messages = action.messages
        try:
            conn.send(messages, None if action.fence is None else encode_fence(action.fence))
        except ConnectionLost as exc:
            cause = f"write failed: {exc}"
            lost = (BackendLost(self.session.generation, cause) if direction == "to_backend"
                    else ClientGone(conn, 1006, cause))
            self._post(lost)
            return False
        if messages:
            self.telemetry.metrics.messages(direction, len(messages), action.nbytes)
        return True

    # ---- teardown ----
    def _teardown(self) -> None:
        """Finish both close handshakes briefly, then drop sockets and greenlets; always runs."""
        pending = self._events.take_all()
        for event in pending:  # what readers handed over as the session ended (its Close frames)
            if type(event) is PerformAsked:
                self._perform_asked(event)
        if self._room is not None:
            self._room.set()  # a reader waiting for room sees the session closed
        for reader in self._readers():
            reader.wake()  # a parked reader may yet have a close handshake to finish
        current = gevent.getcurrent()
        others = [g for g in list(self._group) if g is not current]
        if others:
            gevent.joinall(others, timeout=CLOSE_GRACE_S)
        if self.backend is not None:
            self.backend.abort()
        for client in list(self._client_readers):
            self._release_client(client)
        self._group.kill(timeout=CLOSE_GRACE_S)
        self._backend_reader = None  # it refers back to the pipe: reference counting frees both now
        self._release_backend(failed=False)
        self.leases.stop_waiting(self)
        session = self.session
        if not session.client_attached and session.end_cause in ("grace_expired", "overflow"):
            # the client never came back: the grace ran out, or its buffer filled up meanwhile
            reason = session.close_reason.reason if session.close_reason else session.end_cause
            log.warning("pipe %s: session ended while detached: %s", short_id(self.client_id), reason)
            self.telemetry.resume_event("expired" if session.end_cause == "grace_expired" else "overflow")
        self._cancel_timer()
        self._stopped.set()
        for event in pending + self._events.take_all():  # connections handed over too late
            if type(event) is ClientArrived:
                event.client.abort()
        log.info("pipe %s closed: %s", short_id(self.client_id),
                 self.session.close_reason or "client closed")

