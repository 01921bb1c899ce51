"""One client's failover state machine: inputs in, actions out.  [pure]

The runner in :mod:`iwsproxy.io.pipe` feeds facts into a :class:`Session`
(``client_messages``, ``backend_connected``, ``backend_lost``, ``backend_pong``,
``poll`` with the current time...) and performs the actions it gets back,
strictly in order. The session never touches a socket or a clock, so every
failure point can be unit-tested with plain values.

States::

    CONNECTING --backend_connected--> CONNECTED --backend_lost / pong timeout--> FAILING_OVER
        |                               |   ^                                      ^   |
        |                         drain |   +-----------backend_connected----------|---+
        |                               v                                          |
        |                            DRAINING --backend_drained (its Close reply)--+
        +--(client closed, overflow, deadline, backend ended the session)--> CLOSED (from any state)

A planned drain stops writing to the backend (client messages are buffered),
sends it Close 1001 and waits for its Close reply, which proves it read
everything written before: the window is acknowledged whole, so the move loses
nothing and duplicates nothing. A drain whose backend dies before replying
falls back to an ordinary loss (replay).

Ordering is the product's promise and lives here: messages the lost backend may
not have read (the *window*, at-least-once delivery only) are replayed first,
then those buffered while no backend was connected, then live ones.

Ping fences (at-least-once): after writing messages the session asks for a Ping
whose payload is a fence number. A backend's WebSocket stack answers pings in
order with the data frames before them, so the Pong for fence N proves every
message written before it was read; those leave the window. Each write batch
carries its own fence (in the same write), so a backend that echoes a batch
acknowledges it in the same breath and a kill right after duplicates almost
nothing; at most ``MAX_FENCES_IN_FLIGHT`` are outstanding, after which writes
join the newest fence's window. A fence unanswered after
``pong_timeout_s`` means the backend is not reading: it is abandoned as failed.
An idle connection gets a keepalive fence every ``keepalive_s``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from .buffer import Message, MessageBuffer
from .exceptions import BufferOverflow

__all__ = [
    "State", "Session", "SendToBackend", "CloseClient", "CloseBackend", "AbandonBackend",
    "FailoverReport", "encode_fence", "decode_fence",
]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
MAX_FENCES_IN_FLIGHT = 32  # beyond this, new writes join the last fence's window
CLOSE_TRY_AGAIN_LATER = 1013


class State(str, enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DRAINING = "draining"
    FAILING_OVER = "failing_over"
    CLOSED = "closed"


# ---- actions (imperatives the runner performs in order) ----

@dataclass(frozen=True, slots=True)
class SendToBackend:
    """Write ``messages`` to the current backend, then a Ping carrying ``fence`` if it is set."""
    messages: list[Message]
    fence: int | None = None


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


def encode_fence(number: int) -> bytes:
    return number.to_bytes(8, "big")


def decode_fence(payload: bytes) -> int | None:
    return int.from_bytes(payload, "big") if len(payload) == 8 else None


class Session:
    """The failover core of one :class:`~iwsproxy.io.pipe.PersistentPipe`."""

    def __init__(self, *, buffer_limit_bytes: int, replay: bool = True, now: float,
                 reconnect_deadline_s: float = 0.0, pong_timeout_s: float = 10.0, keepalive_s: float = 20.0):
        self.buffer = MessageBuffer(buffer_limit_bytes)
        self.replay = replay
        self.reconnect_deadline_s = reconnect_deadline_s
        self.pong_timeout_s = pong_timeout_s
        self.keepalive_s = keepalive_s
        self.state = State.CONNECTING
        self.generation = 0          # bumps with each backend connection
        self.failovers = 0           # completed backend switches
        self.replayed_total = 0      # messages re-sent after a loss (possible duplicates)
        self.close_reason: CloseClient | None = None
        self.last_failover: FailoverReport | None = None
        self._waiting_since = now    # when the pipe last had no backend
        self._drain_started = now
        self._replayed = 0
        # fence bookkeeping: absolute message indexes in the stream sent to backends
        self._sent_total = 0
        self._acked_total = 0
        self._next_fence = 1
        self._fences: deque[tuple[int, int, float]] = deque()  # (number, index covered, sent at)
        self._last_fence_at = now

    # ---- queries ----
    @property
    def needs_backend(self) -> bool:
        return self.state in (State.CONNECTING, State.FAILING_OVER)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`poll` has something to do."""
        if self.state is State.DRAINING:
            return self._drain_started + self.pong_timeout_s if self.pong_timeout_s else None
        if self.state is State.CONNECTED:
            if self._fences:
                return self._fences[0][2] + self.pong_timeout_s if self.pong_timeout_s else None
            if self.replay and self.buffer.window_count:
                return self._last_fence_at  # a fence is due now
            return self._last_fence_at + self.keepalive_s if self.keepalive_s else None
        if self.needs_backend and self.reconnect_deadline_s:
            return self._waiting_since + self.reconnect_deadline_s
        return None

    # ---- inputs ----
    def client_messages(self, messages: list[Message], now: float) -> list:
        """The client sent data messages."""
        if self.state is State.CLOSED or not messages:
            return []
        try:
            if self.state is State.CONNECTED:
                if self.replay:
                    self.buffer.add_window(messages)
                    self._sent_total += len(messages)
                    return [SendToBackend(messages, self._take_fence(now))]
                return [SendToBackend(messages)]
            self.buffer.add_pending(messages)
        except BufferOverflow as exc:
            return self._close(CLOSE_TRY_AGAIN_LATER,
                               f"buffer limit of {exc.limit} bytes exceeded")
        return []

    def backend_connected(self, now: float) -> tuple[int, list]:
        """A new backend completed its handshake; returns its generation and the flush."""
        if not self.needs_backend:
            raise RuntimeError(f"backend_connected in state {self.state.value}")
        was_failover = self.state is State.FAILING_OVER
        self.state = State.CONNECTED
        self.generation += 1
        self._fences.clear()
        self._last_fence_at = now
        flushed_bytes = self.buffer.pending_bytes
        messages = self.buffer.take_pending(keep=self.replay)
        if was_failover:
            self.failovers += 1
            self.last_failover = FailoverReport(now - self._waiting_since, self._replayed,
                                                len(messages), flushed_bytes)
        self._replayed = 0
        if not messages:
            return self.generation, []
        fence = None
        if self.replay:
            self._sent_total += len(messages)
            fence = self._take_fence(now)
        return self.generation, [SendToBackend(messages, fence)]

    def drain(self, now: float) -> list:
        """Move off the current backend without loss or duplicates (planned)."""
        if self.state is not State.CONNECTED:
            return []
        self.state = State.DRAINING
        self._fences.clear()
        self._drain_started = now
        return [CloseBackend(self.generation, CLOSE_GOING_AWAY, "backend draining")]

    def backend_drained(self, generation: int, now: float) -> list:
        """The draining backend answered our Close: it read everything we wrote."""
        if generation != self.generation or self.state is not State.DRAINING:
            return []
        self.buffer.ack(self.buffer.window_count)
        self._acked_total = self._sent_total
        self.state = State.FAILING_OVER
        self._waiting_since = self._drain_started
        self._replayed = 0
        return []

    def backend_lost(self, generation: int, now: float) -> list:
        """The backend of ``generation`` is gone (error, EOF, close frame, failed write)."""
        if generation != self.generation or self.state not in (State.CONNECTED, State.DRAINING):
            return []  # stale news about an earlier backend, or already handled
        if self.state is State.DRAINING:
            now = self._drain_started
        self.state = State.FAILING_OVER
        self._waiting_since = now
        self._fences.clear()
        if self.replay:
            self._replayed = self.buffer.rewind()
            self.replayed_total += self._replayed
            self._sent_total = self._acked_total
        return []

    def backend_pong(self, generation: int, payload: bytes, now: float) -> bool:
        """A Pong arrived; returns True when a new fence is due (the runner should poll).

        Pongs come in order, and a backend may answer only the latest of several
        pings, so the Pong for fence N settles every fence up to N.
        """
        fences = self._fences
        number = decode_fence(payload)
        if generation != self.generation or not fences or number is None:
            return False
        if not fences[0][0] <= number <= fences[-1][0]:
            return False  # not one of ours
        covered = fences[0][1]
        while fences and fences[0][0] <= number:
            covered = fences.popleft()[1]
        if self.replay:
            self.buffer.ack(covered - self._acked_total)
            self._acked_total = covered
        return self.replay and not fences and self.buffer.window_count > 0

    def backend_ended_session(self, code: int, reason: str) -> list:
        """The backend closed with a code that ends the conversation (e.g. 1000): tell the client."""
        if self.state is State.CLOSED:
            return []
        return self._close(code, reason, close_backend=False)

    def client_closed(self) -> list:
        """The client closed or vanished: close the backend normally."""
        if self.state is State.CLOSED:
            return []
        connected = self.state in (State.CONNECTED, State.DRAINING)
        self.state = State.CLOSED
        self.buffer.clear()
        return [CloseBackend(self.generation, CLOSE_NORMAL, "client closed")] if connected else []

    def close(self, code: int, reason: str) -> list:
        """The proxy itself ends the session (shutdown, policy)."""
        if self.state is State.CLOSED:
            return []
        return self._close(code, reason)

    def poll(self, now: float) -> list:
        """Act on deadlines: fences due, pong timeouts, the reconnect deadline."""
        if self.state is State.DRAINING:
            if self.pong_timeout_s and now >= self._drain_started + self.pong_timeout_s:
                generation = self.generation
                self.backend_lost(generation, now)
                return [AbandonBackend(generation, f"no close reply within {self.pong_timeout_s:g} s")]
            return []
        if self.state is State.CONNECTED:
            if self._fences:
                if self.pong_timeout_s and now >= self._fences[0][2] + self.pong_timeout_s:
                    generation = self.generation
                    self.backend_lost(generation, now)
                    return [AbandonBackend(generation, f"no pong within {self.pong_timeout_s:g} s")]
                return []
            due = (self.replay and self.buffer.window_count) or (
                self.keepalive_s and now >= self._last_fence_at + self.keepalive_s)
            return [SendToBackend([], self._take_fence(now))] if due else []
        if self.needs_backend and self.reconnect_deadline_s and now >= self._waiting_since + self.reconnect_deadline_s:
            return self._close(CLOSE_TRY_AGAIN_LATER, f"no backend within {self.reconnect_deadline_s:g} s")
        return []

    # ---- internals ----
    def _take_fence(self, now: float) -> int | None:
        """A fence for everything written so far, unless the last one covers it or too many are out."""
        fences = self._fences
        if fences and (len(fences) >= MAX_FENCES_IN_FLIGHT or fences[-1][1] == self._sent_total):
            return None
        number = self._next_fence
        self._next_fence += 1
        fences.append((number, self._sent_total, now))
        self._last_fence_at = now
        return number

    def _close(self, code: int, reason: str, *, close_backend: bool = True) -> list:
        connected = self.state in (State.CONNECTED, State.DRAINING)
        self.state = State.CLOSED
        self.buffer.clear()
        self.close_reason = CloseClient(code, reason)
        actions: list = [self.close_reason]
        if connected and close_backend:
            actions.append(CloseBackend(self.generation, CLOSE_NORMAL, "client session closed"))
        return actions
