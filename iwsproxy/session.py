"""One client's session state machine: inputs in, actions out.  [pure]

The runner in :mod:`iwsproxy.io.pipe` feeds facts into a :class:`Session`
(``client_messages``, ``backend_connected``, ``backend_lost``, ``backend_pong``,
``client_detached``, ``poll`` with the current time...) and performs the actions
it gets back, strictly in order. The session never touches a socket or a clock,
so every failure point can be unit-tested with plain values.

Backend side (``state``)::

    CONNECTING --backend_connected--> CONNECTED --backend_lost / pong timeout--> FAILING_OVER
        |                               |   ^                                      ^   |
        |                         drain |   +-----------backend_connected----------|---+
        |                               v                                          |
        |                            DRAINING --backend_drained (its Close reply)--+
        +--(client closed, overflow, deadline, grace expired, backend ended it)--> CLOSED (from any state)

Client side (``client_attached``): a client that vanishes without a normal
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

import enum
from dataclasses import dataclass, field

from .buffer import Budget, Ledger, Message, payload_bytes
from .exceptions import BufferOverflow

__all__ = [
    "State", "Session", "SendToBackend", "SendToClient", "CloseClient", "CloseBackend", "AbandonBackend",
    "FailoverReport", "encode_fence", "decode_fence", "MAX_FENCES_IN_FLIGHT",
]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013
MAX_FENCES_IN_FLIGHT = 32  # beyond this, new writes join the last fence's window
FENCE_INTERVAL_S = 0.002   # while fences are out, a new one at most this often (one per batch when idle-ish)
EXCUSED_WAIT_LIMIT = 6     # an excused answer is waited for at most this many pong timeouts in all


class State(str, enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DRAINING = "draining"
    FAILING_OVER = "failing_over"
    CLOSED = "closed"


# ---- actions (imperatives the runner performs in order) ----

@dataclass(frozen=True, slots=True)
class SendToBackend:
    """Write ``messages`` to the current backend, then a Ping carrying ``fence`` if it is set.

    ``nbytes`` is their payload size, counted once by the session (it follows from ``messages``).
    """
    messages: list[Message]
    fence: int | None = None
    nbytes: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Write ``messages`` to the attached client, then a Ping carrying ``fence`` if it is set.

    ``nbytes`` is their payload size, counted once by the session (it follows from ``messages``).
    """
    messages: list[Message]
    fence: int | None = None
    nbytes: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class CloseClient:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class CloseBackend:
    """End the backend connection politely (send Close, wait briefly for the reply)."""
    generation: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class AbandonBackend:
    """The backend is considered dead: drop its connection at once and fail over."""
    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class FailoverReport:
    """What the last completed failover did, for logs and metrics."""
    duration_s: float
    replayed: int
    flushed_messages: int
    flushed_bytes: int


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

    def __init__(self, *, buffer_limit_bytes: int, replay: bool = True, now: float,
                 reconnect_deadline_s: float = 0.0, pong_timeout_s: float = 10.0, keepalive_s: float = 20.0,
                 resume_grace_s: float = 0.0, idle_timeout_s: float = 0.0, budget: Budget | None = None):
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
        self.client_attached = True
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

    # ---- queries ----
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
        if self.needs_backend and self.reconnect_deadline_s:
            return self._waiting_since + self.reconnect_deadline_s, "no backend"
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

    def client_closed(self) -> list:
        """The client ended the session (normal close, or vanished with resume off)."""
        if self.state is State.CLOSED:
            return []
        had_backend = self.has_backend
        self.state = State.CLOSED
        self.end_cause = "client_closed"
        self._clear()
        return [CloseBackend(self.generation, CLOSE_NORMAL, "client closed")] if had_backend else []

    def client_detached(self, now: float) -> list:
        """The client vanished without a normal close: hold the session for ``resume_grace_s``."""
        if self.state is State.CLOSED or not self.client_attached:
            return []
        if not self.resume_grace_s:
            return self.client_closed()
        self.client_attached = False
        self._detached_at = now
        self.to_client.rewind()
        return []

    def client_attached_again(self, now: float) -> list:
        """A client came back with this session's id: deliver what it missed, in order."""
        if self.state is State.CLOSED:
            raise RuntimeError("cannot attach a client to a closed session")
        if not self.client_attached:
            self.resumes += 1
        else:
            self.to_client.rewind()  # takeover: the old connection's unacknowledged messages go again
        self.client_attached = True
        self._excused_until["client"] = 0.0
        nbytes = self.to_client.buffer.pending_bytes
        messages, fence = self.to_client.flush(now)
        return [SendToClient(messages, fence, nbytes)] if messages else []

    # ---- inputs from the backend side ----
    def backend_connected(self, now: float) -> tuple[int, list]:
        """A new backend completed its handshake; returns its generation and the flush."""
        if not self.needs_backend:
            raise RuntimeError(f"backend_connected in state {self.state.value}")
        was_failover = self.state is State.FAILING_OVER
        self.state = State.CONNECTED
        self.generation += 1
        self._excused_until["backend"] = 0.0
        ledger = self.to_backend
        ledger.last_fence_at = now
        flushed_bytes = ledger.buffer.pending_bytes
        messages, fence = ledger.flush(now)
        if was_failover:
            self.failovers += 1
            self.last_failover = FailoverReport(now - self._waiting_since, self._replayed,
                                                len(messages), flushed_bytes)
        self._replayed = 0
        return self.generation, ([SendToBackend(messages, fence, flushed_bytes)] if messages else [])

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

    def backend_lost(self, generation: int, now: float) -> list:
        """The backend of ``generation`` is gone (error, EOF, close frame, failed write)."""
        if generation != self.generation or not self.has_backend:
            return []  # stale news about an earlier backend, or already handled
        if self.state is State.DRAINING:
            now = self._drain_started
        self.state = State.FAILING_OVER
        self._waiting_since = now
        self._replayed = self.to_backend.rewind()
        self.replayed_total += self._replayed
        return []

    def drain(self, now: float) -> list:
        """Move off the current backend without loss or duplicates (planned)."""
        if self.state is not State.CONNECTED:
            return []
        self.state = State.DRAINING
        self.to_backend.fences.clear()
        self._drain_started = now
        self._excused_until["backend"] = 0.0
        return [CloseBackend(self.generation, CLOSE_GOING_AWAY, "backend draining")]

    def backend_drained(self, generation: int, now: float) -> list:
        """The draining backend answered our Close: it read everything we wrote."""
        if generation != self.generation or self.state is not State.DRAINING:
            return []
        self.to_backend.settle()
        self.state = State.FAILING_OVER
        self._waiting_since = self._drain_started
        self._replayed = 0
        return []

    def backend_ended_session(self, code: int, reason: str) -> list:
        """The backend closed with a code that ends the conversation (e.g. 1000): tell the client."""
        if self.state is State.CLOSED:
            return []
        return self._close(code, reason, close_backend=False, cause="backend_ended")

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
        if what == "fence":
            return [SendToBackend([], self.to_backend.take_fence(now))]
        if what == "no backend":
            return self._close(CLOSE_TRY_AGAIN_LATER, f"no backend within {self.reconnect_deadline_s:g} s",
                               cause="deadline")
        generation = self.generation  # "no pong" or "no close reply": the backend is lost
        self.backend_lost(generation, now)
        return [AbandonBackend(generation, f"{what} within {self.pong_timeout_s:g} s")]

    # ---- internals ----
    def _clear(self) -> None:
        self.to_backend.buffer.clear()
        self.to_client.buffer.clear()

    def _close(self, code: int, reason: str, *, cause: str, close_backend: bool = True) -> list:
        had_backend = self.has_backend
        self.state = State.CLOSED
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
