"""The per-client outbound log: messages for the backend, capped in bytes.  [pure]

One structure holds both halves of what a pipe owes its backend:

* ``pending``: messages not yet written to any backend (arrived while no backend
  was connected, or replayed after a backend was lost);
* ``window``: messages written to the current backend but not yet proven read
  (see the ping fences in :mod:`iwsproxy.session`).

Both count against one cap, ``limit_bytes``, which bounds the *backlog*. Below half
the cap (``flow_limit_bytes``) a buffer takes a message of any size:

* pending messages are taken one by one: each must fit within the cap, or arrive
  while the buffer holds less than half of it;
* a write to a live peer is taken whole if the buffer holds less than half the cap,
  else only if it fits. Flow control (:meth:`~iwsproxy.session.Session.backend_window_full`,
  ``client_window_full``) holds a sender back once half the cap is unacknowledged, so
  whatever it lets through is taken, including a large message with smaller ones
  behind it in the same read.

So every message the parser allows (up to the max message size) reaches a live peer,
however it compares with the cap, and the cap ends a session (1013) only for a
backlog. One buffer holds at most ``max(limit_bytes, flow_limit_bytes + one read's
messages)``; the process's :class:`Budget` is a hard cap on them all.

Losing a backend *rewinds* the window in front of the pending messages, which
keeps the original order: replayed, then buffered, then live.
"""

from __future__ import annotations

from collections.abc import Iterable

from .accel import speedups
from .exceptions import BufferOverflow

Message = tuple[int, bytes]  # (opcode, payload)

__all__ = ["Message", "MessageBuffer", "Budget", "Ledger", "payload_bytes"]


def python_payload_bytes(messages: list[Message]) -> int:
    """The payload bytes of ``messages`` (a write batch's size, counted once per batch)."""
    return sum([len(m[1]) for m in messages])


#: :func:`python_payload_bytes`, in C when :mod:`iwsproxy.accel` has it
payload_bytes = speedups.payload_bytes if speedups else python_payload_bytes


class Budget:
    """Bytes held across all pipes of a process, against one global cap.

    Shared by every :class:`MessageBuffer` of the process, so the total memory
    held for clients is bounded, not only each client's share.
    """

    __slots__ = ("limit_bytes", "used_bytes")

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0

    def take(self, nbytes: int) -> bool:
        if self.used_bytes + nbytes > self.limit_bytes:
            return False
        self.used_bytes += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used_bytes -= nbytes


class MessageBuffer:
    """A capped FIFO of ``(opcode, payload)`` messages with a sent/unsent split."""

    __slots__ = ("limit_bytes", "flow_limit_bytes", "budget", "_pending", "_window", "pending_bytes",
                 "window_bytes")

    def __init__(self, limit_bytes: int, budget: Budget | None = None):
        if limit_bytes < 0:
            raise ValueError("limit_bytes must be >= 0")
        self.limit_bytes = limit_bytes
        #: below this many bytes held, an addition of any size is taken (the flow-control threshold)
        self.flow_limit_bytes = limit_bytes // 2
        self.budget = budget
        # plain lists: an empty list costs 56 bytes where a deque costs 600+, and idle pipes are many
        self._pending: list[Message] = []
        self._window: list[Message] = []
        self.pending_bytes = 0
        self.window_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self.pending_bytes + self.window_bytes

    @property
    def window_count(self) -> int:
        return len(self._window)

    def __len__(self) -> int:
        return len(self._pending) + len(self._window)

    def _take_budget(self, extra: int) -> None:
        budget = self.budget
        if budget is not None and not budget.take(extra):
            raise BufferOverflow(budget.used_bytes + extra, budget.limit_bytes, scope="global")

    def add_pending(self, messages: Iterable[Message], nbytes: int | None = None) -> None:
        """Queue messages that cannot be written now; all or nothing on overflow (BufferOverflow).

        ``nbytes``, if given, is their :func:`payload_bytes`.
        """
        messages = list(messages)
        extra = payload_bytes(messages) if nbytes is None else nbytes
        held = self.pending_bytes + self.window_bytes
        if held + extra > self.limit_bytes:  # then each must fit, or come while the buffer is under half full
            for _, payload in messages:
                if held >= self.flow_limit_bytes and held + len(payload) > self.limit_bytes:
                    raise BufferOverflow(self.pending_bytes + self.window_bytes + extra, self.limit_bytes)
                held += len(payload)
        self._take_budget(extra)
        self._pending.extend(messages)
        self.pending_bytes += extra

    def add_window(self, messages: list[Message], nbytes: int | None = None) -> None:
        """Record messages written to the peer but not yet acknowledged (``nbytes`` as above);
        all or nothing on overflow (BufferOverflow)."""
        extra = payload_bytes(messages) if nbytes is None else nbytes
        held = self.pending_bytes + self.window_bytes
        if held + extra > self.limit_bytes and held >= self.flow_limit_bytes:
            raise BufferOverflow(held + extra, self.limit_bytes)
        self._take_budget(extra)
        self._window.extend(messages)
        self.window_bytes += extra

    def take_pending(self, *, keep: bool) -> list[Message]:
        """Remove and return every pending message, in order.

        With ``keep`` the messages move into the window (they are about to be
        written and must stay until acknowledged); otherwise they leave the buffer.
        """
        taken, self._pending = self._pending, []
        if keep:
            self._window.extend(taken)
            self.window_bytes += self.pending_bytes
        elif self.budget is not None:
            self.budget.give(self.pending_bytes)
        self.pending_bytes = 0
        return taken

    def ack(self, count: int) -> int:
        """Drop the ``count`` oldest window messages; returns the bytes released."""
        window = self._window
        if count >= len(window):
            released = self.window_bytes
            window.clear()
        else:
            released = sum(len(m[1]) for m in window[:count])
            del window[:count]
        self.window_bytes -= released
        if self.budget is not None:
            self.budget.give(released)
        return released

    def rewind(self) -> int:
        """Move every unacknowledged message back in front of the pending ones.

        Returns how many messages will be replayed.
        """
        replayed = len(self._window)
        if replayed:
            self._window.extend(self._pending)
            self._pending, self._window = self._window, []
            self.pending_bytes += self.window_bytes
            self.window_bytes = 0
        return replayed

    def clear(self) -> None:
        if self.budget is not None:
            self.budget.give(self.pending_bytes + self.window_bytes)
        self._pending.clear()
        self._window.clear()
        self.pending_bytes = self.window_bytes = 0


class Ledger:
    """One direction's replay bookkeeping: a :class:`MessageBuffer` plus ping fences.

    Messages written to the peer join the window; a fence (a Ping whose payload
    is the fence number) written after them is answered by the peer's WebSocket
    stack in order, so its Pong proves every message before it was read and
    those leave the window. Pongs come in order and a peer may answer only the
    latest of several pings, so the Pong for fence N settles every fence up to N.
    A write batch carries its own fence unless one was written less than
    ``fence_interval_s`` ago (under load, one fence covers many batches) or
    ``max_fences`` are out; such writes join the newest fence's window and get a
    fence of their own once the outstanding ones are answered.
    """

    __slots__ = ("buffer", "keep", "max_fences", "fence_interval_s", "fences", "sent_total", "acked_total",
                 "next_fence", "last_fence_at")

    def __init__(self, limit_bytes: int, *, keep: bool, now: float, max_fences: int = 32,
                 fence_interval_s: float = 0.0, budget: Budget | None = None):
        self.buffer = MessageBuffer(limit_bytes, budget)
        self.keep = keep                    # False: no window (at-most-once / no resume)
        self.max_fences = max_fences
        self.fence_interval_s = fence_interval_s  # while fences are out, at most one new one per interval
        self.fences: list[tuple[int, int, float]] = []  # (number, index covered, sent at); at most max_fences
        self.sent_total = 0                 # absolute index of the next message written
        self.acked_total = 0
        self.next_fence = 1
        self.last_fence_at = now

    def write(self, messages: list[Message], now: float, nbytes: int | None = None) -> int | None:
        """Record ``messages`` (of ``nbytes`` payload bytes, if known) as written now; returns the
        fence to write after them (or None).

        Raises :class:`BufferOverflow` if the window would pass the cap.
        """
        if not self.keep:
            return None
        self.buffer.add_window(messages, nbytes)
        self.sent_total += len(messages)
        return self.take_fence(now)

    def flush(self, now: float) -> tuple[list[Message], int | None]:
        """Everything pending (replay first), to be written now, and its fence."""
        messages = self.buffer.take_pending(keep=self.keep)
        if not self.keep or not messages:
            return messages, None
        self.sent_total += len(messages)
        return messages, self.take_fence(now)

    def take_fence(self, now: float) -> int | None:
        """A fence for everything written so far, unless the last one covers it or too many are out."""
        fences = self.fences
        if fences:
            newest = fences[-1]
            if (newest[1] == self.sent_total or len(fences) >= self.max_fences
                    or now - newest[2] < self.fence_interval_s):
                return None
        number = self.next_fence
        self.next_fence += 1
        fences.append((number, self.sent_total, now))
        self.last_fence_at = now
        return number

    def pong(self, number: int | None) -> bool:
        """A Pong for fence ``number``; True when unfenced messages remain (a fence is due)."""
        fences = self.fences
        if number is None or not fences or not fences[0][0] <= number <= fences[-1][0]:
            return False  # not one of ours
        if number == fences[-1][0]:  # the usual: the newest fence, which settles them all
            covered = fences[-1][1]
            fences.clear()
        else:
            settled = 0
            while fences[settled][0] <= number:
                settled += 1
            covered = fences[settled - 1][1]
            del fences[:settled]
        if self.keep:
            self.buffer.ack(covered - self.acked_total)
            self.acked_total = covered
        return self.keep and not fences and self.buffer.window_count > 0

    def settle(self) -> None:
        """The peer provably read everything written (e.g. it answered our Close)."""
        self.buffer.ack(self.buffer.window_count)
        self.acked_total = self.sent_total
        self.fences.clear()

    def rewind(self) -> int:
        """The peer is gone: unacknowledged messages go back in front of the pending ones."""
        self.fences.clear()
        replayed = self.buffer.rewind() if self.keep else 0
        self.sent_total = self.acked_total
        return replayed

    def oldest_fence_at(self) -> float | None:
        return self.fences[0][2] if self.fences else None

    @property
    def fence_due(self) -> bool:
        return self.keep and not self.fences and self.buffer.window_count > 0
