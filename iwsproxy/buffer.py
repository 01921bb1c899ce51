"""The per-client outbound log: messages for the backend, capped in bytes.  [pure]

One structure holds both halves of what a pipe owes its backend:

* ``pending``: messages not yet written to any backend (arrived while no backend
  was connected, or replayed after a backend was lost);
* ``window``: messages written to the current backend but not yet proven read
  (see the ping fences in :mod:`iwsproxy.session`).

Both count against one cap, so a client can never make the proxy hold more than
``limit_bytes`` of its data. Losing a backend *rewinds* the window in front of
the pending messages, which keeps the original order: replayed, then buffered,
then live.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .exceptions import BufferOverflow

Message = tuple[int, bytes]  # (opcode, payload)

__all__ = ["Message", "MessageBuffer"]


class MessageBuffer:
    """A capped FIFO of ``(opcode, payload)`` messages with a sent/unsent split."""

    __slots__ = ("limit_bytes", "_pending", "_window", "pending_bytes", "window_bytes")

    def __init__(self, limit_bytes: int):
        if limit_bytes < 0:
            raise ValueError("limit_bytes must be >= 0")
        self.limit_bytes = limit_bytes
        self._pending: deque[Message] = deque()
        self._window: deque[Message] = deque()
        self.pending_bytes = 0
        self.window_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self.pending_bytes + self.window_bytes

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def window_count(self) -> int:
        return len(self._window)

    def __len__(self) -> int:
        return len(self._pending) + len(self._window)

    def _check(self, extra: int) -> None:
        size = self.pending_bytes + self.window_bytes + extra
        if size > self.limit_bytes:
            raise BufferOverflow(size, self.limit_bytes)

    def add_pending(self, messages: Iterable[Message]) -> None:
        """Queue messages that cannot be written now; all or nothing on overflow."""
        messages = list(messages)
        extra = sum(len(m[1]) for m in messages)
        self._check(extra)
        self._pending.extend(messages)
        self.pending_bytes += extra

    def add_window(self, messages: list[Message]) -> None:
        """Record messages written to the backend but not yet acknowledged."""
        extra = sum(len(m[1]) for m in messages)
        self._check(extra)
        self._window.extend(messages)
        self.window_bytes += extra

    def take_pending(self, *, keep: bool) -> list[Message]:
        """Remove and return every pending message, in order.

        With ``keep`` the messages move into the window (they are about to be
        written and must stay until acknowledged); otherwise they leave the buffer.
        """
        taken = list(self._pending)
        self._pending.clear()
        if keep:
            self._window.extend(taken)
            self.window_bytes += self.pending_bytes
        self.pending_bytes = 0
        return taken

    def ack(self, count: int) -> int:
        """Drop the ``count`` oldest window messages; returns the bytes released."""
        released = 0
        window = self._window
        for _ in range(min(count, len(window))):
            released += len(window.popleft()[1])
        self.window_bytes -= released
        return released

    def rewind(self) -> int:
        """Move every unacknowledged message back in front of the pending ones.

        Returns how many messages will be replayed.
        """
        replayed = len(self._window)
        if replayed:
            self._window.extend(self._pending)
            self._pending, self._window = self._window, deque()
            self.pending_bytes += self.window_bytes
            self.window_bytes = 0
        return replayed

    def clear(self) -> None:
        self._pending.clear()
        self._window.clear()
        self.pending_bytes = self.window_bytes = 0
