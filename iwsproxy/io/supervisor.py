"""The supervisor of a :class:`~iwsproxy.io.pipe.PersistentPipe`: events and deadlines in,
session inputs out.

The supervisor is the greenlet that takes the pipe's mailbox events (:mod:`iwsproxy.io.events`)
one at a time, makes the connect rounds the session asks for, feeds the session the time
(``poll``) and performs what it returns, under both write locks. It sleeps until its next
deadline or event; after ``park_after_s`` without events it hands over to a timer set for its
next deadline and is spawned again by that timer or the next event, so an idle pipe holds no
greenlet. Readers whose Pong settles the fence the supervisor waits for re-arm its timer
(:meth:`Supervisor._settled`), and a write that starts an earlier pong timeout wakes it.
"""

from __future__ import annotations

import logging

from gevent import get_hub

from ..session import State
from .connection import Connection, ConnectionLost
from .events import (BackendClosed, BackendLost, BackendPinged, ClientArrived, ClientGone, DrainAsked, EvacuateAsked,
                     MoveAsked, PerformAsked, PipeEvent, RESCHEDULED, Rescheduled, StopAsked, Woken)

__all__ = ["Supervisor", "short_id", "CLOSE_TAKEN_OVER"]

log = logging.getLogger("iwsproxy.io.pipe")

CLOSE_TAKEN_OVER = 4409
_NEVER = float("inf")


def short_id(client_id: str) -> str:
    """Client ids are credentials once sessions can be resumed: log only a prefix."""
    return client_id[:8]


class Supervisor:
    """The supervisor's part of :class:`~iwsproxy.io.pipe.PersistentPipe` (a base class of it,
    working on the pipe's attributes)."""

    def _post(self, event: PipeEvent) -> None:
        """Put an event in the supervisor's mailbox, spawning the supervisor if it is not running."""
        self._events.put(event)
        if self._supervisor is None and self._running and not self._stopped.is_set():
            self._cancel_timer()
            self._supervisor = self._supervisors.spawn(self._supervise)

    def _supervise(self) -> None:
        ended = True
        try:
            ended = self._work()
        except Exception:
            log.exception("pipe %s: supervisor crashed", short_id(self.client_id))
            self._end_after_crash()
        finally:
            if ended and self._moved:
                try:
                    self._release_moved()
                    self._observe(final=True)
                finally:
                    self._stopped.set()
                    if self._on_ended is not None:
                        self._on_ended(self)
            elif ended:
                try:
                    self._teardown()
                    self._observe(final=True)
                finally:
                    self._stopped.set()  # even if tearing down failed: no supervisor is spawned again
                    if self._on_ended is not None:
                        self._on_ended(self)
            self._supervisor = None

    def _work(self) -> bool:
        """Handle events and deadlines; True when the session has ended, False when no event
        came for ``park_after_s`` (a timer for the next deadline takes over; at once when only a
        timer or a ``reschedule`` woke it)."""
        session = self.session
        linger = self._park_after or _NEVER
        # lingering is for events: woken by a deadline alone the supervisor does what is due and
        # hands over to its timer at once (with parking off it never hands over)
        busy_at = -_NEVER if self._park_after else self.clock()
        while not session.closed:
            now = self.clock()
            if self._evacuation is not None:
                if self._evacuation_done(now):
                    return True
                round_ = None  # no backend is connected for a session that leaves
            else:
                round_ = session.connect_due(now)
            if round_ is not None:
                self._connect_round(round_)
            if self._park_at is not None and now >= self._park_at:
                self._park_idle_readers(now)
            deadline = self._next_deadline()
            self._observe()
            if not self._events and now - busy_at >= linger and deadline > now:
                self._arm_timer(deadline)
                return False
            self._armed = deadline
            until = min(deadline, busy_at + linger)
            event = self._events.get(None if until == _NEVER else max(0.0, until - self.clock()))
            self._armed = 0.0  # awake: readers need not wake us
            if event is not None:
                if type(event) is not Rescheduled:
                    busy_at = self.clock()
                self._handle(event)
                if self._moved:
                    return True
            if not session.closed:
                with self._holding(backend=True, client=True):  # poll may write either way
                    now = self.clock()
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
            if conn is None or other is None:
                continue
            if self.session.excuse_if_held_up(side, since, now, unread=conn.has_unread(),
                                              other_stalled_at=other.stalled_at):
                log.info("pipe %s: the %s's answer is late, but may wait unread behind its data: "
                         "waiting again", short_id(self.client_id), side)
                self.telemetry.count(f"{side}_answers_excused")

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
        evacuation = self._evacuation.deadline if self._evacuation is not None else None
        deadlines = [d for d in (self.session.next_deadline(), self._park_at, evacuation) if d is not None]
        return min(deadlines) if deadlines else _NEVER

    def _holding(self, *, backend: bool = False, client: bool = False):
        """The pipe's write locks of the given sides, held (see :meth:`WriteLocks.holding
        <iwsproxy.io.locks.WriteLocks.holding>`)."""
        return self._locks.holding(self, backend=backend, client=client)

    def drop_stuck(self, side: str, conn: Connection) -> None:
        """The write lock's watchdog found ``side`` taking none of our bytes: drop it."""
        log.warning("pipe %s: the %s took none of our writes for %g s: dropping its connection",
                    short_id(self.client_id), side, self.session.pong_timeout_s)
        self.telemetry.count(side + "s_dropped_stuck")
        conn.abort()  # the stuck writer fails at once and lets go of its lock

    def _arm_timer(self, deadline: float) -> None:
        """Sleep without a greenlet: the next event, or this timer, spawns the supervisor again."""
        self._armed = deadline
        if deadline < _NEVER:
            self._timer = get_hub().loop.timer(max(0.0, deadline - self.clock()))
            self._timer.start(self._timer_fired)

    def _timer_fired(self) -> None:
        self._post(RESCHEDULED)  # runs in the hub: only spawns

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
            self._post(RESCHEDULED)
            return
        deadline = self._next_deadline()
        if deadline != self._armed:
            self._cancel_timer()
            self._arm_timer(deadline)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()

    def _handle(self, event: PipeEvent) -> None:
        """Turn one mailbox event into session inputs and perform what they return."""
        kind = type(event)
        if kind is BackendLost:
            self._lose_backend(event.generation, event.cause)
        elif kind is BackendClosed:
            self._on_backend_closed(event.generation, event.code, event.reason)
        elif kind is BackendPinged:
            self._on_backend_ping(event.generation, event.payload)
        elif kind is ClientGone:
            self._on_client_gone(event.client, event.code, event.reason)
        elif kind is ClientArrived:
            self._on_attach(event.client)
        elif kind is DrainAsked:
            self._on_drain(event.url)
        elif kind is StopAsked:
            self._on_stop(event.code, event.reason)
        elif kind is EvacuateAsked:
            self._on_evacuate(event)
        elif kind is Woken:
            self.session.pool_changed(self.clock())
        elif kind is PerformAsked:
            self._perform_asked(event)
        elif kind is MoveAsked:
            self._on_move(event)
        # Rescheduled: nothing to do but recompute the next deadline (the loop does)

    def _perform_asked(self, event: PerformAsked) -> None:
        with self._holding(backend=True, client=True):
            self._perform(list(event.actions))

    def _on_backend_closed(self, generation: int, code: int, reason: str) -> None:
        session = self.session
        if generation != session.generation or not session.has_backend:
            return
        if session.backend_close_is_loss(code) and self.backend is not None:
            self.backend.abort()  # a writer stuck on it fails now, before we wait for its lock
        with self._holding(backend=True, client=True):  # it may end the session: both sides
            self._perform(session.backend_closed(generation, code, reason, self.clock()))

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
        if self._evacuation is not None:  # its Close reply (or its end): it resumes elsewhere
            self._let_go(client)
            session.client_detached(self.clock())
            return
        if session.detaches(code):
            self._let_go(client)
            with self._holding(client=True):
                self._perform(session.client_gone(code, self.clock()))
            log.info("pipe %s: client detached (%s %s); holding the session for %g s",
                     short_id(self.client_id), code, reason, session.resume_grace_s)
            self.telemetry.resume_event("detached")
            return
        log.info("pipe %s: client closed (%s %s)", short_id(self.client_id), code, reason)
        with self._holding(backend=True):
            self._perform(session.client_gone(code, self.clock()))

    def _on_attach(self, client: Connection) -> None:
        session = self.session
        if session.closed:
            self._let_go(client, 1001, "session ended")
            return
        if self._evacuation is not None:
            self._let_go(client, self._evacuation.code, self._evacuation.reason)
            return
        with self._holding(client=True):  # no write to the old connection is under way after this
            old = self.client
            if old is not None:
                log.info("pipe %s: session taken over by a new connection", short_id(self.client_id))
                self._let_go(old, CLOSE_TAKEN_OVER, "session taken over by a new connection")
                self.telemetry.client_closed(CLOSE_TAKEN_OVER, "takeover")
                self.telemetry.resume_event("takeover")
            else:
                log.info("pipe %s: client resumed", short_id(self.client_id))
                self.telemetry.resume_event("resumed")
            self._use_client(client)
            self._perform(session.client_attached_again(self.clock()))

    def _on_drain(self, url: str) -> None:
        if self.backend_url == url and self.session.state is State.CONNECTED:
            log.info("pipe %s: draining backend %s", short_id(self.client_id), url)
            with self._holding(backend=True):
                self._perform(self.session.drain(self.clock()))

    def _on_stop(self, code: int, reason: str) -> None:
        with self._holding(backend=True, client=True):  # closes both
            self._perform(self.session.close(code, reason))

    # ---- evacuation (see PersistentPipe.evacuate) ----
    def _on_evacuate(self, event: EvacuateAsked) -> None:
        session = self.session
        if self._evacuation is not None or session.closed:
            return
        self._evacuation = event
        log.info("pipe %s: evacuating (%s)", short_id(self.client_id), event.reason)
        with self._holding(backend=True, client=True):
            if session.state is State.CONNECTED:
                self._perform(session.drain(self.clock()))  # Close 1001; its reply settles the backend
            if self.client is not None and session.client_attached:
                self.telemetry.client_closed(event.code, "takeover" if event.code == CLOSE_TAKEN_OVER else "proxy")
                self.client.send_close(event.code, event.reason)  # its reply (or end) detaches it

    def _evacuation_done(self, now: float) -> bool:
        """Has the evacuation finished (both Close replies in, or its deadline passed)? If so the
        session has been handed to ``on_done`` and closed here."""
        event, session = self._evacuation, self.session
        if now >= event.deadline:
            if session.has_backend:  # no Close reply in time: what it did not acknowledge is replayed
                with self._holding(backend=True):
                    session.backend_lost(session.generation, now, "no close reply to the evacuation")
                self._release_backend(failed=False)
            if session.client_attached and self.client is not None:
                self._let_go(self.client)
                session.client_detached(now)
        if session.has_backend or session.client_attached:
            return False
        from .carry import export_pipe  # late: carry imports the pipe module
        snapshot = None
        try:
            snapshot = export_pipe(self, getattr(self.leases, "name", "default"))
        except Exception:
            log.exception("pipe %s: the session could not be exported", short_id(self.client_id))
        self.evacuated = snapshot is not None
        with self._holding(backend=True, client=True):
            self._perform(session.close(event.code, event.reason))  # detached, no backend: gives back its bytes
        try:
            event.on_done(self, snapshot)
        except Exception:
            log.exception("pipe %s: handing over the evacuated session failed", short_id(self.client_id))
        return True

    def _lose_backend(self, generation: int, cause: str) -> None:
        session = self.session
        if generation != session.generation or not session.has_backend:
            return
        if self.backend is not None:
            self.backend.abort()  # unblocks a writer stuck on a dead peer before we take the lock
        with self._holding(backend=True):
            self._perform(session.backend_lost(generation, self.clock(), cause))
