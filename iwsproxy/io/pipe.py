"""PersistentPipe: one client session, driven through its :class:`~iwsproxy.session.Session`.

A pipe runs in greenlets of its own, and only while they have work: the
request that opened it hands the client socket over and ends.

* the *supervisor* reacts to events posted to its mailbox (backend lost, client
  gone, attach, drain, stop, wake-ups), runs the reconnect loop with backoff and
  performs deadline actions (pong timeouts, keepalive fences, resume grace);
* the *client reader* block-reads the client and writes to the backend;
* one *backend reader* per backend connection block-reads the backend and writes
  to the client.

After ``park_after_s`` without work each of them is given up: the supervisor
hands over to a timer set for its next deadline and is spawned again by it or
by the next event; a reader is parked (:class:`_Reader`) and an idle watcher
spawns a new one when data arrives. An idle pipe is objects and watchers, no
greenlet (a blocked greenlet costs about 8 KiB). ``park_after_s = 0`` keeps all
three for the pipe's life.

Every session call that leads to a backend write happens under
``_backend_lock``, together with that write, so the order the session decided
is the order on the wire; ``_client_lock`` does the same for client writes.
The backend reader never takes the backend lock (a writer blocked on a backend
that is itself blocked writing to us would deadlock); it only posts events to
the supervisor's mailbox. The supervisor is the only greenlet that takes both
locks; while it waits for one, or writes itself, a write that has taken no byte
for ``--pong-timeout`` is stuck on a peer that stopped reading, and that peer's
connection is dropped (:meth:`PersistentPipe._holding`). A reader whose peer has left half the
buffer cap unacknowledged waits for that peer's Pong before it hands on more (flow control:
TCP then holds its own sender back). The supervisor sleeps
until its next deadline or event; a reader whose write starts an earlier
deadline (a new pong timeout) wakes it.

A client that vanishes without a normal close is let go while the pipe lives
on, detached; a new connection with the same id is handed to the pipe
(:meth:`PersistentPipe.attach`) and gets a client reader of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import gevent
from gevent import get_hub
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.pool import Group

from ..backoff import backoff
from ..buffer import Message
from ..exceptions import BackendError, BackendRejected, NoBackendAvailable, ProtocolError
from ..frames import OP_PING, OP_PONG, parse_close_payload
from ..pool import Admin, Backend
from ..session import (AbandonBackend, CloseBackend, CloseClient, SendToBackend, SendToClient, Session, State,
                       encode_fence)
from .backend import OFFERED, BackendConnection, ClientOffer, connect_backend
from .connection import CLOSE_SEND_TIMEOUT_S, Connection, ConnectionLost, Parked

if TYPE_CHECKING:
    from .manager import PipeManager

__all__ = ["PersistentPipe"]

log = logging.getLogger(__name__)
monotonic = time.monotonic

CLOSE_GRACE_S = 2.0      # how long a close handshake may take before the socket is dropped
# a backend close with one of these codes ends the client's session (the application said so);
# any other close, error or EOF is a failover
_ENDS_SESSION = frozenset({1000}) | frozenset(range(4000, 5000))
# a client gone with one of these (no Close frame, or "going away") may come back: detach, don't end
_DETACHES = frozenset({1001, 1006})
CLOSE_TAKEN_OVER = 4409
_NEVER = float("inf")


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
                               pong_timeout_s=settings.pong_timeout_s, keepalive_s=settings.keepalive_s,
                               resume_grace_s=settings.resume_grace_s,
                               idle_timeout_s=settings.idle_timeout_s, budget=manager.budget)
        self.client: Connection | None = None   # None while detached
        self._client_readers: dict[Connection, _Reader] = {}  # every client connection the pipe holds
        self._backend_reader: _Reader | None = None
        self._park_after = settings.park_after_s
        # a Close waits for a peer that takes bytes, and gives up on one that takes none for this long
        self._stall_timeout_s = max(settings.pong_timeout_s, CLOSE_SEND_TIMEOUT_S)
        self._park_at: float | None = None    # when the supervisor next looks for idle readers to park
        self.backend: BackendConnection | None = None
        self._lease: Backend | None = None    # the pool's backend that self.backend counts against
        self.subprotocol: str | None = None
        self.reconnects = 0          # backend connections made after the first
        self.last_move_ms: float | None = None  # how long the last backend switch took
        self._backend_lock = Semaphore()      # session calls + backend writes, together
        self._client_lock = Semaphore()       # session calls + client writes, together
        self._running = False
        self._supervisor_waits = False        # for a write lock: readers yield between writes
        self._to_backend_turn = Semaphore()   # client readers (more than one after a takeover) in turn
        self._room_for: str | None = None     # the peer whose acknowledgements a reader waits for
        self._room: Event | None = None       # set when they may have come (made by the first wait)
        self._closing = False                 # the client closed: a reconnect with its id is a new session
        self._events = _Mailbox()
        self._supervisor: gevent.Greenlet | None = None
        self._timer = None                    # the supervisor's next deadline while it is not running
        self._group = Group()
        self._stopped = Event()
        self._retry_at: float | None = None
        self._armed = 0.0                     # the deadline the supervisor (or its timer) waits for; 0: awake
        self._delays = None
        self._first_connect = True
        self._lost_from: str | None = None    # the backend last lost (for the failover's log line)
        self._avoid: str | None = None        # ... which the next connect round leaves out
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
        session = self.session
        state = session.state.value if session.client_attached or session.closed else "detached"
        return {"client": short_id(self.client_id), "state": state, "backend_state": session.state.value,
                "backend": self.backend_url, "buffered_bytes": session.to_backend.buffer.total_bytes,
                "buffered_to_client_bytes": session.to_client.buffer.total_bytes, "resumes": session.resumes,
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

    def start(self, client: Connection) -> None:
        """Serve the pipe with its first client connection; returns at once (the pipe owns ``client``).

        When the pipe ends it calls ``manager.pipe_ended(pipe)``.
        """
        self._running = True
        self._use_client(client)
        log.info("pipe %s open: backend=%s subprotocol=%s", short_id(self.client_id), self.backend_url,
                 self.subprotocol)
        if self.backend is not None:
            self._spawn_backend_reader(self.backend, self.session.generation)
        if self.session.needs_backend:
            self._retry_at = monotonic()
        if self._park_after:
            self._park_at = monotonic() + self._park_after
        self._observe()
        self._post(("reschedule",))

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
        self._post(("attach", client))

    @property
    def running(self) -> bool:
        """Serving a client connection (False while the first one waits for its backend)."""
        return self._running

    @property
    def ending(self) -> bool:
        """The session is over; the pipe is tearing down or has."""
        return self._closing or self.session.closed or self._stopped.is_set()

    @property
    def client_attached(self) -> bool:
        return self.session.client_attached and not self.session.closed

    def _use_client(self, client: Connection) -> None:
        client.stall_timeout_s = self._stall_timeout_s
        self.client = client
        self._client_readers[client] = _Reader(self, client, self._read_client)

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

    def _linger(self, client: Connection, reader: "_Reader") -> None:
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
        self._post(("stop", code, reason))

    def drain(self, url: str) -> None:
        """Move this pipe off ``url`` without loss or duplicates (from any greenlet)."""
        self._post(("drain", url))

    def wake(self) -> None:
        """Something changed (pool, fence due): let the supervisor look again."""
        self._post(("wake",))

    # ---- supervisor ----
    def _post(self, event: tuple) -> None:
        """Put an event in the supervisor's mailbox, spawning the supervisor if it is not running."""
        self._events.put(event)
        if self._supervisor is None and self._running and not self._stopped.is_set():
            self._cancel_timer()
            self._supervisor = gevent.spawn(self._supervise)

    def _supervise(self) -> None:
        ended = True
        try:
            ended = self._work()
        except Exception:
            log.exception("pipe %s: supervisor crashed", short_id(self.client_id))
            self._end_after_crash()
        finally:
            if ended:
                try:
                    self._teardown()
                    self._observe(final=True)
                finally:
                    self._stopped.set()  # even if tearing down failed: no supervisor is spawned again
                    self.manager.pipe_ended(self)
            self._supervisor = None

    def _work(self) -> bool:
        """Handle events and deadlines; True when the session has ended, False when no event
        came for ``park_after_s`` (a timer for the next deadline takes over; at once when only a
        timer or a ``reschedule`` woke it)."""
        session = self.session
        linger = self._park_after or _NEVER
        # lingering is for events: woken by a deadline alone the supervisor does what is due and
        # hands over to its timer at once (with parking off it never hands over)
        busy_at = -_NEVER if self._park_after else monotonic()
        while not session.closed:
            now = monotonic()
            if session.needs_backend and self._retry_at is not None and now >= self._retry_at:
                self._connect_round(now)
                if session.needs_backend and not session.closed:
                    self._retry_at = monotonic() + next(self._delays_iter())
            if self._park_at is not None and now >= self._park_at:
                self._park_idle_readers(now)
            deadline = self._next_deadline()
            self._observe()
            if not self._events and now - busy_at >= linger and deadline > now:
                self._arm_timer(deadline)
                return False
            self._armed = deadline
            until = min(deadline, busy_at + linger)
            event = self._events.get(None if until == _NEVER else max(0.0, until - monotonic()))
            self._armed = 0.0  # awake: readers need not wake us
            if event is not None:
                if event[0] != "reschedule":
                    busy_at = monotonic()
                self._handle(event)
            if not session.closed:
                with self._holding(backend=True, client=True):  # poll may write either way
                    now = monotonic()
                    self._excuse_held_up_peers(now)
                    self._perform(session.poll(now))
            if self._room_for is not None:  # a peer lost, gone or closed frees a waiting reader too
                self._room.set()
            self._observe()
        return True

    def _excuse_held_up_peers(self, now: float) -> None:
        """Give a peer whose answer (a Pong, a Close reply) is late another ``--pong-timeout`` if
        that answer may be waiting unread on our side: bytes from the peer wait in our socket,
        and since the wait began our reader of it may have been held up behind a write to the
        other side that had to wait for the other peer (a fast backend's Pong behind what it
        sends a slow client). The other peer is slow but takes our bytes: one that takes none is
        dropped by :meth:`_holding` (while this supervisor waited for its lock). The session
        stops excusing after ``EXCUSED_WAIT_LIMIT`` pong timeouts in all."""
        for side, since in self.session.late_answers(now):
            conn, other = (self.backend, self.client) if side == "backend" else (self.client, self.backend)
            if (conn is not None and other is not None and other.stalled_at >= since and conn.has_unread()
                    and self.session.excuse(side, now)):
                log.info("pipe %s: the %s's answer is late, but may wait unread behind its data: "
                         "waiting again", short_id(self.client_id), side)
                self.manager.counters[f"{side}_answers_excused"] += 1

    def _end_after_crash(self) -> None:
        """Close the session (its buffers go back to the process's budget) and the client with 1011."""
        try:
            with self._holding(backend=True, client=True):
                self._perform(self.session.close(1011, "internal error"))
        except Exception:
            log.exception("pipe %s: closing after a crash failed too", short_id(self.client_id))

    def _next_deadline(self) -> float:
        """When the supervisor must look again: the session's next deadline, a retry, or a look
        for idle readers."""
        session = self.session
        deadlines = [d for d in (session.next_deadline(), self._retry_at if session.needs_backend else None,
                                 self._park_at) if d is not None]
        return min(deadlines) if deadlines else _NEVER

    @contextmanager
    def _holding(self, *, backend: bool = False, client: bool = False) -> Iterator[None]:
        """Hold the write locks of the given sides (the backend's first), never waiting on a
        peer that has stopped reading.

        While the supervisor waits for a lock, and while it holds them and writes itself (a
        replay, a flush, a Close), every ``--pong-timeout`` it looks at the writes under way:
        one that took no byte since the last look is stuck on a peer that stopped reading, and
        that peer's connection is dropped (the client's first: when both are stuck, a client
        that stopped reading is the usual cause, the backend then being blocked writing to us).
        That fails the stuck write (its writer reports the loss, as for any failed write) and
        frees the lock. A client is then treated as gone without a Close (it could not be
        sent), a backend as lost (failover, its unacknowledged messages replayed). A slow peer
        that takes bytes is waited for. With ``--pong-timeout 0`` the waits have no limit."""
        held = []
        timeout = self.session.pong_timeout_s
        seen: dict = {}
        watchdog = None
        try:
            for wanted, lock in ((backend, self._backend_lock), (client, self._client_lock)):
                if wanted:
                    self._take(lock, timeout, seen)
                    held.append(lock)
            if timeout:
                self._note_writes(seen)
                watchdog = get_hub().loop.timer(timeout, timeout)
                watchdog.start(self._drop_stuck_writes, seen)
            yield
        finally:
            if watchdog is not None:
                watchdog.close()
            for lock in reversed(held):
                lock.release()

    def _take(self, lock: Semaphore, timeout: float, seen: dict) -> None:
        if not timeout:
            lock.acquire()
            return
        self._supervisor_waits = True  # the readers let it in between their writes
        try:
            self._note_writes(seen)
            while not lock.acquire(timeout=timeout):
                self._drop_stuck_writes(seen)
        finally:
            self._supervisor_waits = False

    def _note_writes(self, seen: dict) -> None:
        """Note in ``seen`` where each connection's writes stand."""
        seen.clear()
        for side, conn in (("client", self.client), ("backend", self.backend)):
            if conn is not None:
                seen[side] = (conn, conn.progress)

    def _drop_stuck_writes(self, seen: dict) -> None:
        """Drop the connection (at most one) whose write is under way and has taken no byte since
        the last look, noted in ``seen``."""
        for side, conn in (("client", self.client), ("backend", self.backend)):
            if conn is None:
                continue
            if conn.writing and seen.get(side) == (conn, conn.progress):
                log.warning("pipe %s: the %s took none of our writes for %g s: dropping its connection",
                            short_id(self.client_id), side, self.session.pong_timeout_s)
                self.manager.counters[side + "s_dropped_stuck"] += 1
                conn.abort()  # the stuck writer fails at once and lets go of its lock
                break
        self._note_writes(seen)

    def _arm_timer(self, deadline: float) -> None:
        """Sleep without a greenlet: the next event, or this timer, spawns the supervisor again."""
        self._armed = deadline
        if deadline < _NEVER:
            self._timer = get_hub().loop.timer(max(0.0, deadline - monotonic()))
            self._timer.start(self._timer_fired)

    def _timer_fired(self) -> None:
        self._post(("reschedule",))  # runs in the hub: only spawns

    def _timer_fence(self, ledger) -> float | None:
        """When the waiting supervisor (on its timer, or in its greenlet) waits for the pong
        timeout of ``ledger``'s oldest fence (as after a keepalive), that fence's send time; else
        None. Cheap: readers ask it for every Pong."""
        if not self._armed:
            return None
        oldest = ledger.oldest_fence_at()
        timeout = self.session.pong_timeout_s
        return oldest if oldest is not None and timeout and oldest + timeout == self._armed else None

    def _settled(self, ledger, armed_for: float | None, keepalive_s: float) -> None:
        """A Pong came for ``ledger`` while the supervisor waits. If it settled every fence, and
        the wait was for the pong timeout of one of them, or the next keepalive (every
        ``keepalive_s``; 0: none) now falls before its end, the supervisor must look again: a
        supervisor sleeping on its timer gets the timer set for the next deadline, one waiting in
        its greenlet (lingering, or always with ``--park-after 0``) is woken. It then neither wakes
        for nothing nor sends the keepalive late. Under load the wait is for something else and
        this returns at once."""
        if ledger.oldest_fence_at() is not None or self._events:
            return
        if armed_for is None and not (keepalive_s and ledger.last_fence_at + keepalive_s < self._armed):
            return
        if self._supervisor is not None:
            self._post(("reschedule",))
            return
        deadline = self._next_deadline()
        if deadline != self._armed:
            self._cancel_timer()
            self._arm_timer(deadline)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()

    def _readers(self) -> list["_Reader"]:
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
            self._park_at = monotonic() + self._park_after
            if self._park_at < self._armed:  # the supervisor sleeps past it
                self._post(("reschedule",))

    def _observe(self, final: bool = False) -> None:
        """Report state and buffer changes to metrics (once per supervisor turn, not per message)."""
        metrics, session = self.manager.metrics, self.session
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

    def _delays_iter(self):
        if self._delays is None:
            s = self.manager.settings
            self._delays = backoff(initial_s=s.backoff_initial_s, max_s=s.backoff_max_s)
            next(self._delays)  # the immediate first retry was the round just made
        return self._delays

    def _handle(self, event: tuple) -> None:
        """Dispatch one mailbox event ``(kind, *args)`` to ``_on_<kind>``."""
        getattr(self, "_on_" + event[0])(*event[1:])

    def _on_backend_lost(self, generation: int, cause: str) -> None:
        self._lose_backend(generation, cause)

    def _on_backend_closed(self, generation: int, code: int, reason: str) -> None:
        session = self.session
        if generation != session.generation:
            return
        if session.state is State.DRAINING:  # the Close reply we waited for: a clean move
            url = self.backend_url
            session.backend_drained(generation, monotonic())
            self._release_backend(failed=False)
            self._retry_now(url, "drain")
        elif code in _ENDS_SESSION:
            log.info("pipe %s: backend %s ended the session (%s %s)", short_id(self.client_id),
                     self.backend_url, code, reason)
            if self.backend is not None:
                with self._holding(backend=True):
                    self.backend.send_close(code, reason)  # complete its close handshake (echo the code)
            self._release_backend(failed=False)
            self._perform(session.backend_ended_session(code, reason))
        else:
            self._lose_backend(generation, f"backend closed with {code} {reason}".rstrip())

    def _on_backend_ping(self, generation: int, payload: bytes) -> None:
        # after our Close (a drain) a ping needs no answer: the backend's Close reply is what we wait for
        if generation == self.session.generation and self.backend is not None and not self.backend.close_sent:
            try:
                with self._holding(backend=True):
                    self.backend.pong(payload)
            except ConnectionLost as exc:
                self._lose_backend(generation, f"write failed: {exc}")

    def _on_client_gone(self, client: Connection, code: int, reason: str) -> None:
        session = self.session
        if client is not self.client:
            return  # an earlier connection of this client (taken over): already let go
        if code in _DETACHES and session.resume_grace_s:
            self._let_go(client)
            with self._holding(client=True):
                session.client_detached(monotonic())
            log.info("pipe %s: client detached (%s %s); holding the session for %g s",
                     short_id(self.client_id), code, reason, session.resume_grace_s)
            self.manager.record_resume_event("detached")
            return
        log.info("pipe %s: client closed (%s %s)", short_id(self.client_id), code, reason)
        with self._holding(backend=True):
            self._perform(session.client_closed())

    def _on_attach(self, client: Connection) -> None:
        session = self.session
        if session.closed:
            self._let_go(client, 1001, "session ended")
            return
        with self._holding(client=True):  # no write to the old connection is under way after this
            old = self.client
            if old is not None:
                log.info("pipe %s: session taken over by a new connection", short_id(self.client_id))
                self._let_go(old, CLOSE_TAKEN_OVER, "session taken over by a new connection")
                self.manager.record_client_closed(CLOSE_TAKEN_OVER, "takeover")
                self.manager.record_resume_event("takeover")
            else:
                log.info("pipe %s: client resumed", short_id(self.client_id))
                self.manager.record_resume_event("resumed")
            self._use_client(client)
            self._perform(session.client_attached_again(monotonic()))

    def _on_drain(self, url: str) -> None:
        if self.backend_url == url and self.session.state is State.CONNECTED:
            log.info("pipe %s: draining backend %s", short_id(self.client_id), url)
            with self._holding(backend=True):
                self._perform(self.session.drain(monotonic()))

    def _on_stop(self, code: int, reason: str) -> None:
        with self._holding(backend=True, client=True):  # closes both
            self._perform(self.session.close(code, reason))

    def _on_reschedule(self) -> None:
        """Nothing to do but recompute the next deadline (the loop does)."""

    def _on_wake(self) -> None:
        if self.session.needs_backend:
            self._retry_at = monotonic()

    def _retry_now(self, lost_from: str | None, cause: str) -> None:
        """The backend is gone: look for the next one at once, with a fresh backoff."""
        self._lost_from, self._lost_cause = lost_from, cause
        self._avoid = lost_from
        self._delays = None
        self._retry_at = monotonic()

    def _lose_backend(self, generation: int, cause: str) -> None:
        if generation != self.session.generation or self.session.state not in (State.CONNECTED, State.DRAINING):
            return
        conn = self.backend
        if conn is not None:
            conn.abort()  # unblocks a writer stuck on a dead peer before we take the lock
        with self._backend_lock:
            self.session.backend_lost(generation, monotonic())
        url = conn.url if conn else None
        log.info("pipe %s: backend %s lost: %s", short_id(self.client_id), url, cause)
        self._release_backend(failed=True, cause=cause)
        self._retry_now(url, cause)

    def _release_backend(self, *, failed: bool, cause: str = "") -> None:
        """Stop using the backend connection: close its socket and give its slot back to the pool."""
        conn, self.backend = self.backend, None
        lease, self._lease = self._lease, None
        if conn is not None:
            conn.abort()
        if lease is not None:
            self.manager.release_backend(lease, failed=failed, cause=cause)

    def abandon(self) -> None:
        """Give back the backend of a pipe that will never start (its client was not answered);
        whoever waits for it to close (a shutdown) need not wait any longer."""
        self._release_backend(failed=False)
        self._stopped.set()

    def _connect_round(self, now: float) -> list:
        """Try each usable backend once; returns [(url, error)] for those that failed."""
        manager, session = self.manager, self.session
        # the backend just lost is not tried in the first round after the loss (if there is another);
        # later rounds try every backend, or a pipe could never go back to it while the others are down
        avoid, self._avoid = self._avoid, None
        exclude = {avoid} if avoid and manager.pool_size() > 1 else set()
        tried: list = []
        while session.needs_backend and not session.closed:
            lease = manager.acquire_backend(exclude)
            if lease is None:
                break
            url = lease.url
            exclude.add(url)
            try:
                conn = connect_backend(url, self.offer,
                                       reconnects=0 if self._first_connect else self.reconnects + 1,
                                       timeout_s=manager.settings.connect_timeout_s,
                                       max_message_size=manager.settings.max_message_size_bytes,
                                       max_fragments=manager.settings.max_fragments,
                                       sslopt=manager.backend_sslopt, mask_source=manager.mask_source,
                                       # once the client is answered, its subprotocol is settled
                                       subprotocol=self.subprotocol if self._running else OFFERED)
            except BackendRejected as exc:
                manager.release_backend(lease, failed=not self._first_connect, cause=str(exc))
                if self._first_connect and 400 <= exc.status < 500:
                    raise  # the backend refused this client: it gets the same answer
                tried.append((url, exc))
                continue
            except BackendError as exc:
                manager.release_backend(lease, failed=True, cause=str(exc))
                tried.append((url, exc))
                log.warning("pipe %s: backend %s failed: %s", short_id(self.client_id), url, exc.detail)
                continue
            if session.closed:
                conn.abort()
                manager.release_backend(lease, failed=False)
                break
            self._attach(conn, lease)
            return tried
        if tried and session.needs_backend and not self._first_connect:
            log.warning("pipe %s: no backend reachable (%d tried)", short_id(self.client_id), len(tried))
        if session.needs_backend:
            manager.wait_for_backend(self)
        return tried

    def _attach(self, conn: BackendConnection, lease: Backend) -> None:
        manager, session = self.manager, self.session
        manager.backend_succeeded(conn.url)
        manager.stop_waiting(self)
        if not self._running:  # the client is answered with this backend's choice
            self.subprotocol = conn.subprotocol
        if not self._first_connect:
            self.reconnects += 1
        was_first = self._first_connect and not self._running
        self._first_connect = False
        conn.stall_timeout_s = self._stall_timeout_s
        with self._holding(backend=True):
            self.backend, self._lease = conn, lease
            generation, actions = session.backend_connected(monotonic())
            if self._running:
                # reading before the flush: a backend that answers what it reads (an echo) would
                # otherwise stop reading a flush larger than the sockets hold, and the flush would wait for it
                self._spawn_backend_reader(conn, generation)
            self._perform(actions)
        if lease.admin is Admin.DRAINING:  # drained while this handshake was under way: move on
            self.drain(conn.url)
        report = session.last_failover
        if report is not None and session.failovers == self.reconnects and not was_first:
            log.info("pipe %s: failover %s -> %s after %s: %.1f ms, %d replayed, %d messages / %d bytes flushed",
                     short_id(self.client_id), self._lost_from, conn.url, self._lost_cause or "waiting",
                     report.duration_s * 1000, report.replayed, report.flushed_messages, report.flushed_bytes)
            self.last_move_ms = round(report.duration_s * 1000, 1)
            manager.record_failover(report)

    def _spawn_backend_reader(self, conn: BackendConnection, generation: int) -> None:
        self._backend_reader = _Reader(self, conn, self._read_backend, generation)

    # ---- actions ----
    def _perform(self, actions: list) -> None:
        """Perform session actions in order; backend writes must hold ``_backend_lock``.

        After a failed write to one side (its loss is reported) the later writes to that side
        are skipped; the rest is still performed (a fence for the other side, a Close)."""
        backend_ok = client_ok = True
        for action in actions:
            if type(action) is SendToBackend:
                if backend_ok:
                    backend_ok = self._send(self.backend, action, "to_backend")
            elif type(action) is SendToClient:
                if client_ok:
                    client_ok = self._send(self.client, action, "to_client")
            elif type(action) is CloseClient:
                log.info("pipe %s: closing client with %d %s", short_id(self.client_id), action.code, action.reason)
                self.manager.record_client_closed(action.code, self.session.end_cause)
                if self.client is not None:
                    self.client.send_close(action.code, action.reason)
            elif type(action) is CloseBackend:
                if self.backend is not None:
                    self.backend.send_close(action.code, action.reason)
            elif type(action) is AbandonBackend:
                log.warning("pipe %s: abandoning backend %s: %s", short_id(self.client_id), self.backend_url,
                            action.reason)
                url = self.backend_url
                self._release_backend(failed=True, cause=action.reason)
                self._retry_now(url, action.reason)

    def _send(self, conn: Connection | None, action: SendToBackend | SendToClient, direction: str) -> bool:
        """Write one send action; False (with the loss reported) if the connection failed."""
        if conn is None:
            return True
        messages = action.messages
        try:
            conn.send(messages, None if action.fence is None else encode_fence(action.fence))
        except ConnectionLost as exc:
            cause = f"write failed: {exc}"
            lost = (("backend_lost", self.session.generation, cause) if direction == "to_backend"
                    else ("client_gone", conn, 1006, cause))
            self._post(lost)
            return False
        if messages:
            self.manager.metrics.messages(direction, len(messages), action.nbytes)
        return True

    # ---- readers ----
    def _read_client(self, client: Connection) -> None:
        session = self.session
        lock = self._backend_lock
        try:
            while True:
                data = client.read()
                close = None
                for op, payload in client.controls:  # usually none; pongs first: they free buffer space
                    if op == OP_PING:
                        client.pong(payload)
                    elif op == OP_PONG:
                        armed_for = self._timer_fence(session.to_client)
                        if session.client_pong(payload, monotonic()):
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
            self._post(("client_gone", client, 1006, str(exc)))

    def _client_data(self, data: list[Message], lock: Semaphore, session: Session) -> None:
        # in turn: a batch an old connection's reader holds while it waits for room goes on before
        # what a new connection (a takeover) reads meanwhile
        with self._to_backend_turn:
            if session.backend_window_full():
                self._wait_for_room("backend", session.backend_window_full)
            with lock:
                self._perform(session.client_messages(data, monotonic()))
        if self._supervisor_waits:
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
        if client is self.client and not (code in _DETACHES and self.session.resume_grace_s):
            self._closing = True  # the session ends when the supervisor gets to it: not to be rejoined
        self._post(("client_gone", client, code or 1005, reason))
        if echoed:  # the client closed first: its late frames (a Pong) must not reset our reply
            client.linger(CLOSE_GRACE_S)

    def _client_broke_protocol(self, client: Connection, exc: ProtocolError) -> None:
        log.info("pipe %s: client broke the protocol: %s", short_id(self.client_id), exc)
        self.manager.record_client_closed(exc.close_code, "protocol")
        client.send_close(exc.close_code, exc.reason)
        self._post(("client_gone", client, exc.close_code, exc.reason))

    def _read_backend(self, conn: BackendConnection, generation: int) -> None:
        session = self.session
        lock = self._client_lock
        try:
            while True:
                data = conn.read()
                close = None
                for op, payload in conn.controls:  # as above
                    if op == OP_PONG:
                        armed_for = self._timer_fence(session.to_backend)
                        if session.backend_pong(generation, payload, monotonic()):
                            self.wake()
                        elif self._armed:
                            self._settled(session.to_backend, armed_for, session.keepalive_s)
                        if self._room_for is not None:
                            self._room.set()
                    elif op == OP_PING:
                        self._post(("backend_ping", generation, payload))
                    else:
                        close = payload
                if data:
                    self._backend_data(data, lock, session)
                if close is not None:
                    try:
                        code, reason = parse_close_payload(close)
                    except ProtocolError as exc:
                        code, reason = exc.close_code, exc.reason
                    self._post(("backend_closed", generation, code or 1005, reason))
                    return
        except ProtocolError as exc:
            conn.send_close(exc.close_code, exc.reason)
            self._post(("backend_lost", generation, f"protocol error: {exc.reason}"))
        except ConnectionLost as exc:
            self._post(("backend_lost", generation, str(exc)))

    def _backend_data(self, data: list[Message], lock: Semaphore, session: Session) -> None:
        if session.client_window_full():
            self._wait_for_room("client", session.client_window_full)
        with lock:
            self._perform(session.backend_messages(data, monotonic()))
        if self._supervisor_waits:
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
                    conn.stalled_at = monotonic()
                self._room.clear()
                self._room.wait(self.session.pong_timeout_s or None)
        finally:
            self._room_for = None
            conn = self.backend if peer == "backend" else self.client
            if conn is not None:
                conn.stalled_at = monotonic()

    def _crashed(self, greenlet) -> None:
        """A reader crashed: the supervisor ends the session (1011)."""
        log.error("pipe %s: greenlet crashed", short_id(self.client_id), exc_info=greenlet.exc_info)
        self._post(("stop", 1011, "internal error"))

    # ---- teardown ----
    def _teardown(self) -> None:
        """Finish both close handshakes briefly, then drop sockets and greenlets; always runs."""
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
        self.manager.stop_waiting(self)
        session = self.session
        if not session.client_attached and session.end_cause in ("grace_expired", "overflow"):
            # the client never came back: the grace ran out, or its buffer filled up meanwhile
            reason = session.close_reason.reason if session.close_reason else session.end_cause
            log.warning("pipe %s: session ended while detached: %s", short_id(self.client_id), reason)
            self.manager.record_resume_event("expired" if session.end_cause == "grace_expired" else "overflow")
        self._cancel_timer()
        self._stopped.set()
        for event in self._events.take_all():  # connections handed over too late
            if event[0] == "attach":
                event[1].abort()
        log.info("pipe %s closed: %s", short_id(self.client_id),
                 self.session.close_reason or "client closed")


class _Reader:
    """Runs a pipe's read loop for one connection: in a greenlet while the connection
    has traffic, as an idle watcher while it is parked.

    ``target(conn, *args)`` returns when the connection is done with; if it is
    parked (:class:`Parked` raised from its read) a new greenlet runs it again
    when data arrives.
    """

    __slots__ = ("conn", "_pipe", "_target", "_args", "greenlet", "finished", "reads_seen", "_done")

    def __init__(self, pipe: PersistentPipe, conn: Connection, target, *args):
        self.conn, self._pipe, self._target, self._args = conn, pipe, target, args
        self.greenlet = None
        self.finished = False
        self.reads_seen = -1   # the connection's read count at the supervisor's last look
        self._done: Event | None = None
        self._spawn()

    def _spawn(self) -> None:
        self.greenlet = self._pipe._group.spawn(self._run)
        self.greenlet.link_exception(self._pipe._crashed)

    def _run(self) -> None:
        parked = False
        try:
            self._target(self.conn, *self._args)
        except Parked:
            parked = True
        finally:
            self.greenlet = None
            if not parked:
                self.finished = True
                if self._done is not None:
                    self._done.set()
        if parked:
            self._pipe.manager.counters["readers_parked"] += 1
            self.conn.call_when_readable(self._unpark)

    def _unpark(self) -> None:
        self.conn.resume(self._pipe._reader_unparked)  # a lone pong parks it again by itself
        self._spawn()

    def park(self) -> None:
        """Let go of the greenlet if it is waiting for data (else nothing happens)."""
        self.conn.park()

    def wake(self) -> None:
        """Run again now if parked."""
        if self.conn.stop_watching():
            self._spawn()

    def wait_finished(self, timeout: float) -> bool:
        if self.finished:
            return True
        if self._done is None:
            self._done = Event()
        return self._done.wait(timeout)


class _Mailbox:
    """The supervisor's inbox: a list and an Event (a gevent Queue costs three deques per pipe)."""

    __slots__ = ("_items", "_ready")

    def __init__(self) -> None:
        self._items: list[tuple] = []
        self._ready = Event()

    def put(self, item: tuple) -> None:
        self._items.append(item)
        self._ready.set()

    def __bool__(self) -> bool:
        return bool(self._items)

    def take_all(self) -> list[tuple]:
        items, self._items = self._items, []
        return items

    def get(self, timeout: float | None) -> tuple | None:
        """The oldest item, waiting up to ``timeout`` for one; None if none came."""
        items = self._items
        if not items:
            self._ready.clear()
            self._ready.wait(timeout)
            if not items:
                return None
        return items.pop(0)
