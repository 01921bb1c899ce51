"""One client's session state machine: inputs in, actions out.  [pure]

The runner in :mod:`iwsproxy.io.pipe` feeds facts into a :class:`Session`
(``client_messages``, ``backend_connected``, ``backend_lost``, ``backend_pong``,
``client_detached``, ``poll`` with the current time...) and performs the actions
it gets back, strictly in order. The session never touches a socket or a clock,
so every failure point can be unit-tested with plain values.

Its states and every transition are the tables of :mod:`iwsproxy.states` (shown in
``docs/session-states.md``); the session changes state only through them. Backend side
(``state``): CONNECTING, CONNECTED, DRAINING, FAILING_OVER, CLOSED (the end). Client side
(``client_side``): a client that vanishes without a normal
close is *detached* for ``resume_grace_s``; the backend connection stays and
what it sends is buffered; a client that comes back with the same id is
attached again and gets, in order, what its old connection had not
acknowledged, then what was buffered, then live traffic.

Ordering is the product's promise and lives here. Towards the backend: messages
the lost backend may not have read (the *window*, at-least-once delivery only)
are replayed first, then those buffered while no backend was connected, then
live ones. Towards the client, the same with client-side fences.

Ping fences (see :class:`~iwsproxy.buffer.Ledger`): after each write batch the
session asks for a Ping whose payload is a fence number; a WebSocket stack
answers pings in order with the data frames before them, so the Pong proves
those frames were read. A backend fence unanswered after ``pong_timeout_s``
means the backend is not reading: it is abandoned as failed. An idle backend
gets a keepalive fence every ``keepalive_s``. A Pong can also be late through no
fault of the peer: it waits, unread, behind the peer's data while the runner's
reader is held up by the other side (a slow client behind a fast backend). The
runner then excuses that peer (:meth:`Session.excuse`): the wait starts again, up to
``EXCUSED_WAIT_LIMIT`` pong timeouts in all.

A planned drain stops writing to the backend (client messages are buffered),
sends it Close 1001 and waits for its Close reply, which proves it read
everything written before: the window is settled whole, so the move loses
nothing and duplicates nothing. A drain whose backend dies before replying
falls back to an ordinary loss (replay).
"""

from __future__ import annotations


from .backoff import retry_delay
from .buffer import Budget, Ledger, Message, payload_bytes
from .exceptions import BufferOverflow
from .actions import (AbandonBackend, CloseBackend, CloseClient, ConnectBackend, FailoverReport, RecordFailover,
                      ReleaseBackend, SendToBackend, SendToClient, stuck_peer_to_drop)
from .states import ClientSide, IllegalTransition, State, move, move_client

__all__ = [
    "State", "Session", "SendToBackend", "SendToClient", "CloseClient", "CloseBackend", "AbandonBackend",
    "ReleaseBackend", "ConnectBackend", "RecordFailover", "FailoverReport", "encode_fence", "decode_fence",
    "stuck_peer_to_drop", "MAX_FENCES_IN_FLIGHT", "ENDS_SESSION", "DETACHES",
]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013
MAX_FENCES_IN_FLIGHT = 32  # beyond this, new writes join the last fence's window
FENCE_INTERVAL_S = 0.002   # while fences are out, a new one at most this often (one per batch when idle-ish)
EXCUSED_WAIT_LIMIT = 6     # an excused answer is waited for at most this many pong timeouts in all
#: a backend Close with one of these codes ends the client's session (the application said so);
#: any other Close, an error or EOF is a failover
ENDS_SESSION = frozenset({1000}) | frozenset(range(4000, 5000))
#: a client gone with one of these (no Close frame, or "going away") may come back: with resume on
#: its session is detached, not ended
DETACHES = frozenset({1001, 1006})


def _overflow_reason(exc: BufferOverflow) -> str:
    if exc.scope == "global":
        return "proxy buffer budget exhausted"
    return f"buffer limit of {exc.limit} bytes exceeded"


def encode_fence(number: int) -> bytes:
    return number.to_bytes(8, "big")


def decode_fence(payload: bytes) -> int | None:
    return int.from_bytes(payload, "big") if len(payload) == 8 else None


class Session:
    """The core of one :class:`~iwsproxy.io.pipe.PersistentPipe`."""

    # slots: an idle process holds one per pipe (a dict of this many keys would cost 1.3 KiB more)
    __slots__ = ("to_backend", "to_client", "idle_timeout_s", "_flow_limit", "last_activity", "buffer", "replay",
                 "reconnect_deadline_s", "pong_timeout_s", "keepalive_s", "resume_grace_s", "state", "client_side",
                 "generation", "failovers", "replayed_total", "resumes", "close_reason", "end_cause",
                 "last_failover", "_waiting_since", "_drain_started", "_excused_until", "_detached_at", "_replayed",
                 "backoff_initial_s", "backoff_max_s", "backoff_jitter", "backend_url", "_retry_at", "_retries",
                 "_avoid", "_lost_cause")

    def __init__(self, *, buffer_limit_bytes: int, replay: bool = True, now: float,
                 reconnect_deadline_s: float = 0.0, pong_timeout_s: float = 10.0, keepalive_s: float = 20.0,
                 resume_grace_s: float = 0.0, idle_timeout_s: float = 0.0, budget: Budget | None = None,
                 backoff_initial_s: float = 0.05, backoff_max_s: float = 5.0, backoff_jitter: float = 0.5):
        self.to_backend = Ledger(buffer_limit_bytes, keep=replay, now=now, max_fences=MAX_FENCES_IN_FLIGHT,
                                 fence_interval_s=FENCE_INTERVAL_S, budget=budget)
        self.to_client = Ledger(buffer_limit_bytes, keep=resume_grace_s > 0, now=now,
                                max_fences=MAX_FENCES_IN_FLIGHT, fence_interval_s=FENCE_INTERVAL_S, budget=budget)
        self.idle_timeout_s = idle_timeout_s
        self._flow_limit = buffer_limit_bytes // 2  # see backend_window_full
        self.last_activity = now     # last data message either way (for the idle timeout)
        self.buffer = self.to_backend.buffer
        self.replay = replay
        self.reconnect_deadline_s = reconnect_deadline_s
        self.pong_timeout_s = pong_timeout_s
        self.keepalive_s = keepalive_s
        self.resume_grace_s = resume_grace_s
        self.state = State.CONNECTING
        self.client_side = ClientSide.ATTACHED
        self.generation = 0          # bumps with each backend connection
        self.failovers = 0           # completed backend switches
        self.replayed_total = 0      # messages re-sent to backends after a loss (possible duplicates)
        self.resumes = 0             # times a client came back
        self.close_reason: CloseClient | None = None
        #: why the session ended: client_closed, overflow, grace_expired, idle, deadline,
        #: client_unresponsive, backend_ended or proxy (shutdown, internal error)
        self.end_cause: str | None = None
        self.last_failover: FailoverReport | None = None
        self._waiting_since = now    # when the pipe last had no backend
        self._drain_started = now
        # an answer late through no fault of its peer is waited for until then (see excuse)
        self._excused_until = {"backend": 0.0, "client": 0.0}
        self._detached_at = now
        self._replayed = 0
        # finding a backend: the next connect round at _retry_at (None: none planned), _retries
        # rounds in a row having failed, _avoid left out of the next round
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.backoff_jitter = backoff_jitter  # 0: the bare delays (a repeatable session, for tests)
        self.backend_url: str | None = None   # the backend in use, or the one last lost
        self._retry_at: float | None = now
        self._retries = 0
        self._avoid: str | None = None
        self._lost_cause = ""

    # ---- queries ----
    @property
    def client_attached(self) -> bool:
        return self.client_side is ClientSide.ATTACHED

    @property
    def needs_backend(self) -> bool:
        return self.state in (State.CONNECTING, State.FAILING_OVER)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def has_backend(self) -> bool:
        return self.state in (State.CONNECTED, State.DRAINING)

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`poll` has something to do."""
        if self.state is State.CLOSED:
            return None
        deadlines = [due[0] for due in (self._backend_due(), self._client_due()) if due is not None]
        if self.idle_timeout_s:
            deadlines.append(self.last_activity + self.idle_timeout_s)
        return min(deadlines, default=None)

    # What falls due when, one side at a time: (time, what). poll() acts on what is due and
    # next_deadline() reports the earliest time, so the rules are written once.
    def _backend_due(self) -> tuple[float, str] | None:
        timeout = self.pong_timeout_s
        if self.state is State.DRAINING:
            due = max(self._drain_started + timeout, self._excused_until["backend"])
            return (due, "no close reply") if timeout else None
        if self.state is State.CONNECTED:
            ledger = self.to_backend
            oldest = ledger.oldest_fence_at()
            if oldest is not None:
                return (max(oldest + timeout, self._excused_until["backend"]), "no pong") if timeout else None
            if ledger.fence_due:
                return ledger.last_fence_at, "fence"  # now
            return (ledger.last_fence_at + self.keepalive_s, "fence") if self.keepalive_s else None
        if self.needs_backend:
            give_up = self._waiting_since + self.reconnect_deadline_s if self.reconnect_deadline_s else None
            if self._retry_at is not None and (give_up is None or self._retry_at < give_up):
                return self._retry_at, "connect"
            return (give_up, "no backend") if give_up is not None else None
        return None

    def _client_due(self) -> tuple[float, str] | None:
        if not self.client_attached:
            return self._detached_at + self.resume_grace_s, "not resumed"
        ledger = self.to_client
        oldest = ledger.oldest_fence_at()
        if oldest is not None:
            timeout = self.pong_timeout_s
            return (max(oldest + timeout, self._excused_until["client"]), "no pong") if timeout else None
        return (ledger.last_fence_at, "fence") if ledger.fence_due else None  # now

    # ---- inputs from the client side ----
    def client_messages(self, messages: list[Message], now: float) -> list:
        """The client sent data messages."""
        if self.state is State.CLOSED or not messages:
            return []
        self.last_activity = now
        try:
            nbytes = payload_bytes(messages)
            if self.state is State.CONNECTED:
                return [SendToBackend(messages, self.to_backend.write(messages, now, nbytes), nbytes)]
            self.to_backend.buffer.add_pending(messages, nbytes)
        except BufferOverflow as exc:
            return self._close(CLOSE_TRY_AGAIN_LATER, _overflow_reason(exc), cause="overflow")
        return []

    def client_pong(self, payload: bytes, now: float) -> bool:
        """A Pong from the client; True when a new client fence is due (the runner should poll)."""
        return self.client_attached and self.to_client.pong(decode_fence(payload))

    def detaches(self, code: int) -> bool:
        """Would a client connection ending with ``code`` (1006: no Close frame) detach the session
        (held for a resume) rather than end it?"""
        return code in DETACHES and self.resume_grace_s > 0

    def client_gone(self, code: int, now: float) -> list:
        """The attached client's connection ended with ``code``: the session is detached if the
        client may come back (:meth:`detaches`), else it ends."""
        if self.detaches(code):
            return self.client_detached(now)
        return self.client_closed()

    def client_closed(self) -> list:
        """The client ended the session (normal close, or vanished with resume off)."""
        if self.state is State.CLOSED:
            return []
        had_backend = self.has_backend
        self.state = move(self.state, "end")
        self.end_cause = "client_closed"
        self._clear()
        return [CloseBackend(self.generation, CLOSE_NORMAL, "client closed")] if had_backend else []

    def client_detached(self, now: float) -> list:
        """The client vanished without a normal close: hold the session for ``resume_grace_s``."""
        if self.state is State.CLOSED or not self.client_attached:
            return []
        if not self.resume_grace_s:
            return self.client_closed()
        self.client_side = move_client(self.client_side, "client detached")
        self._detached_at = now
        self.to_client.rewind()
        return []

    def client_attached_again(self, now: float) -> list:
        """A client came back with this session's id: deliver what it missed, in order."""
        if self.state is State.CLOSED:
            raise IllegalTransition("cannot attach a client to a closed session")
        if not self.client_attached:
            self.resumes += 1
        else:
            self.to_client.rewind()  # takeover: the old connection's unacknowledged messages go again
        self.client_side = move_client(self.client_side, "client attached")
        self._excused_until["client"] = 0.0
        nbytes = self.to_client.buffer.pending_bytes
        messages, fence = self.to_client.flush(now)
        return [SendToClient(messages, fence, nbytes)] if messages else []

    # ---- inputs from the backend side ----
    def connect_due(self, now: float) -> ConnectBackend | None:
        """The connect round to make now, if one is due: the caller makes it (outside any write
        lock: it waits for handshakes) and reports with :meth:`backend_connected` or
        :meth:`connect_failed`. Rounds after a failed one wait out a growing, jittered delay."""
        if not self.needs_backend or self._retry_at is None or now < self._retry_at:
            return None
        self._retry_at = None
        avoid, self._avoid = self._avoid, None  # the backend just lost sits out one round only
        return ConnectBackend(avoid)

    def connect_failed(self, now: float) -> list:
        """No backend of the round could be connected: the next round waits a backoff delay, or
        less if the pool changes (:meth:`pool_changed`)."""
        if self.needs_backend:
            self._retries += 1
            self._retry_at = now + retry_delay(self._retries, initial_s=self.backoff_initial_s,
                                               max_s=self.backoff_max_s, jitter=self.backoff_jitter)
        return []

    def pool_changed(self, now: float) -> list:
        """A backend was added or freed: a session waiting for one tries again at once."""
        if self.needs_backend and self._retry_at is not None:
            self._retry_at = now
        return []

    def backend_connected(self, now: float, url: str | None = None) -> tuple[int, list]:
        """A new backend (at ``url``) completed its handshake; returns its generation and the flush,
        followed by a :class:`RecordFailover` if this connection completed a failover."""
        if not self.needs_backend:
            raise IllegalTransition(f"'backend connected' in state {self.state.value}")
        was_failover = self.state is State.FAILING_OVER
        lost_from, self.backend_url = self.backend_url, url
        self.state = move(self.state, "backend connected")
        self.generation += 1
        self._retry_at, self._retries, self._avoid = None, 0, None
        self._excused_until["backend"] = 0.0
        ledger = self.to_backend
        ledger.last_fence_at = now
        flushed_bytes = ledger.buffer.pending_bytes
        messages, fence = ledger.flush(now)
        actions: list = [SendToBackend(messages, fence, flushed_bytes)] if messages else []
        if was_failover:
            self.failovers += 1
            self.last_failover = FailoverReport(now - self._waiting_since, self._replayed, len(messages),
                                                flushed_bytes, lost_from, url, self._lost_cause or "waiting")
            actions.append(RecordFailover(self.last_failover))
        self._replayed = 0
        return self.generation, actions

    def backend_messages(self, messages: list[Message], now: float) -> list:
        """The backend sent data messages for the client."""
        if self.state is State.CLOSED or not messages:
            return []
        self.last_activity = now
        ledger = self.to_client
        try:
            nbytes = payload_bytes(messages)
            if self.client_attached:
                return [SendToClient(messages, ledger.write(messages, now, nbytes), nbytes)]
            ledger.buffer.add_pending(messages, nbytes)
        except BufferOverflow as exc:
            return self._close(CLOSE_TRY_AGAIN_LATER, _overflow_reason(exc), cause="overflow")
        return []

    def backend_pong(self, generation: int, payload: bytes, now: float) -> bool:
        """A Pong from the backend; True when a new fence is due (the runner should poll)."""
        if generation != self.generation or not self.has_backend:
            return False
        return self.to_backend.pong(decode_fence(payload))

    def backend_lost(self, generation: int, now: float, cause: str = "backend lost") -> list:
        """The backend of ``generation`` is gone (error, EOF, failed write, no answer): what it may
        not have read is replayed to the next one, which is looked for at once."""
        if generation != self.generation or not self.has_backend:
            return []  # stale news about an earlier backend, or already handled
        if self.state is State.DRAINING:
            now = self._drain_started
        self.state = move(self.state, "backend lost")
        self._waiting_since = now
        self._replayed = self.to_backend.rewind()
        self.replayed_total += self._replayed
        self._look_again(now, cause)
        return [AbandonBackend(generation, cause)]

    def backend_close_is_loss(self, code: int) -> bool:
        """Is a backend Close with ``code`` now a loss (a failover), rather than the reply a drain
        waits for or an end of the session?"""
        return self.state is not State.DRAINING and code not in ENDS_SESSION

    def backend_closed(self, generation: int, code: int, reason: str, now: float) -> list:
        """The backend of ``generation`` sent a Close with ``code``: the reply a drain waited for
        (a clean move), an end of the session it asks for (:data:`ENDS_SESSION`: the client is
        closed with the same code), or else a loss like any other."""
        if generation != self.generation or not self.has_backend:
            return []
        if self.state is State.DRAINING:
            return self.backend_drained(generation, now)
        if code in ENDS_SESSION:
            # its close handshake completed (the code echoed) before the client hears of it
            actions: list = [CloseBackend(generation, code, reason), ReleaseBackend(generation, "ended the session")]
            return actions + self._close(code, reason, close_backend=False, cause="backend_ended")
        return self.backend_lost(generation, now, f"backend closed with {code} {reason}".rstrip())

    def _look_again(self, now: float, cause: str) -> None:
        """The backend is gone: look for the next one at once, with a fresh backoff, leaving out
        the one just lost in the first round."""
        self._lost_cause = cause
        self._avoid = self.backend_url
        self._retry_at, self._retries = now, 0

    def drain(self, now: float) -> list:
        """Move off the current backend without loss or duplicates (planned)."""
        if self.state is not State.CONNECTED:
            return []
        self.state = move(self.state, "drain")
        self.to_backend.fences.clear()
        self._drain_started = now
        self._excused_until["backend"] = 0.0
        return [CloseBackend(self.generation, CLOSE_GOING_AWAY, "backend draining")]

    def backend_drained(self, generation: int, now: float) -> list:
        """The draining backend answered our Close: it read everything we wrote."""
        if generation != self.generation or self.state is not State.DRAINING:
            return []
        self.to_backend.settle()
        self.state = move(self.state, "backend drained")
        self._waiting_since = self._drain_started
        self._replayed = 0
        self._look_again(now, "drain")
        return [ReleaseBackend(generation, "drained")]

    # ---- flow control ----
    def backend_window_full(self) -> bool:
        """Has the backend left half the buffer cap unacknowledged? The runner then holds the
        client's next messages back (and so, through TCP, the client) until the backend's Pong
        frees room: the cap is there for what waits for a backend that is gone, not for a fast
        sender to a live one."""
        ledger = self.to_backend
        return self.state is State.CONNECTED and ledger.keep and ledger.buffer.total_bytes >= self._flow_limit

    def client_window_full(self) -> bool:
        """The same towards an attached client (with resume on, what it has not acknowledged)."""
        ledger = self.to_client
        return self.client_attached and ledger.keep and ledger.buffer.total_bytes >= self._flow_limit

    # ---- answers late through no fault of the peer ----
    def late_answers(self, now: float) -> list[tuple[str, float]]:
        """The sides ("backend", "client") whose answer (a Pong, or a draining backend's Close
        reply) is overdue at ``now``, each with when the wait for it began or was last excused:
        :meth:`poll` would give them up. The runner may :meth:`excuse` one whose answer can be
        waiting unread on its own side."""
        late = []
        for side, due in (("backend", self._backend_due()), ("client", self._client_due())):
            if due is not None and due[1] in ("no pong", "no close reply") and now >= due[0]:
                # since the wait began, or since the last excuse: each excuse needs fresh evidence
                since = max(self._waiting_for_answer_since(side), self._excused_until[side] - self.pong_timeout_s)
                late.append((side, since))
        return late

    def excuse(self, side: str, now: float) -> bool:
        """The answer of ``side`` may be among what the runner has not read yet (its reader was
        held up writing to the other side): wait for it one more ``pong_timeout_s``. False, and
        no more waiting, once it is ``EXCUSED_WAIT_LIMIT`` pong timeouts late: a peer that streams
        to a slow client and never reads would otherwise be excused for ever."""
        since = self._waiting_for_answer_since(side)
        if since is None or now - since >= EXCUSED_WAIT_LIMIT * self.pong_timeout_s:
            return False
        self._excused_until[side] = now + self.pong_timeout_s
        return True

    def excuse_if_held_up(self, side: str, since: float, now: float, *, unread: bool,
                          other_stalled_at: float) -> bool:
        """Excuse the late answer of ``side`` (one of :meth:`late_answers`, waited for ``since``)
        if it may be waiting unread on our side: bytes from that peer wait unread (``unread``) and
        our writes to the other peer have stalled since the wait began (``other_stalled_at``), so
        our reader of ``side`` may have been held up behind them. A peer that takes none of our
        bytes is dropped by the I/O layer's write watchdog instead. True if excused."""
        return unread and other_stalled_at >= since and self.excuse(side, now)

    def _waiting_for_answer_since(self, side: str) -> float | None:
        if side == "client":
            return self.to_client.oldest_fence_at()
        if self.state is State.DRAINING:
            return self._drain_started
        return self.to_backend.oldest_fence_at()

    # ---- the proxy's own decisions ----
    def close(self, code: int, reason: str) -> list:
        """The proxy itself ends the session (shutdown, policy)."""
        if self.state is State.CLOSED:
            return []
        return self._close(code, reason, cause="proxy")

    def poll(self, now: float) -> list:
        """Act on deadlines: fences due, pong timeouts, the reconnect deadline, resume grace."""
        if self.state is State.CLOSED:
            return []
        client = self._client_due()
        if client is not None and client[1] == "not resumed" and now >= client[0]:
            return self._close(CLOSE_GOING_AWAY, f"client did not resume within {self.resume_grace_s:g} s",
                               cause="grace_expired")
        if self.idle_timeout_s and now >= self.last_activity + self.idle_timeout_s:
            return self._close(CLOSE_GOING_AWAY, f"idle for {self.idle_timeout_s:g} s", cause="idle")
        backend = self._backend_due()
        actions = self._backend_falls_due(backend[1], now) if backend is not None and now >= backend[0] else []
        if self.state is not State.CLOSED and client is not None and now >= client[0]:
            if client[1] == "no pong":
                actions += self._close(CLOSE_GOING_AWAY, f"client did not answer a ping within "
                                                         f"{self.pong_timeout_s:g} s", cause="client_unresponsive")
            else:
                actions.append(SendToClient([], self.to_client.take_fence(now)))
        return actions

    def _backend_falls_due(self, what: str, now: float) -> list:
        if what == "connect":
            return []  # see connect_due
        if what == "fence":
            return [SendToBackend([], self.to_backend.take_fence(now))]
        if what == "no backend":
            return self._close(CLOSE_TRY_AGAIN_LATER, f"no backend within {self.reconnect_deadline_s:g} s",
                               cause="deadline")
        # "no pong" or "no close reply": the backend is lost
        return self.backend_lost(self.generation, now, f"{what} within {self.pong_timeout_s:g} s")

    # ---- internals ----
    def _clear(self) -> None:
        self.to_backend.buffer.clear()
        self.to_client.buffer.clear()

    def _close(self, code: int, reason: str, *, cause: str, close_backend: bool = True) -> list:
        had_backend = self.has_backend
        self.state = move(self.state, "end")
        self.end_cause = cause
        self._clear()
        self.close_reason = CloseClient(code, reason)
        actions: list = [self.close_reason] if self.client_attached else []
        if had_backend and close_backend:
            actions.append(CloseBackend(self.generation, CLOSE_NORMAL, "client session closed"))
        return actions

    # ---- snapshots (see iwsproxy.snapshot) ----
    def export(self, now: float, extra: dict | None = None) -> bytes:
        """This session's complete state at ``now`` as bytes, with the caller's JSON object
        ``extra``: :func:`iwsproxy.snapshot.export`."""
        from . import snapshot
        return snapshot.export(self, now, extra)

    @staticmethod
    def restore(data: bytes, now: float, *, budget: Budget | None = None, **settings) -> tuple["Session", dict]:
        """A session from :meth:`export`'s bytes at ``now``, and its ``extra``; ``settings`` given
        replace the snapshot's: :func:`iwsproxy.snapshot.restore` (raises ``SnapshotError``)."""
        from . import snapshot
        return snapshot.restore(data, now, budget=budget, **settings)
