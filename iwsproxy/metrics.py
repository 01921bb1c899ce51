"""What the proxy reports about itself. This base class records nothing.

The I/O layer calls these hooks at the points where things happen (per batch,
never per byte); an implementation turns them into metrics.
"""

from __future__ import annotations

__all__ = ["Metrics"]


class Metrics:
    def pipe_opened(self) -> None: ...

    def pipe_closed(self) -> None: ...

    def pipe_state(self, old: str | None, new: str | None) -> None:
        """A pipe moved from state ``old`` to ``new`` (None: not yet / no longer a pipe)."""

    def buffered_bytes(self, delta: int) -> None:
        """The bytes held for backends across pipes changed by ``delta``."""

    def failover(self, duration_s: float, replayed: int, flushed_bytes: int) -> None: ...

    def client_closed(self, code: int, reason: str) -> None:
        """The proxy closed a client (1013 overflow, 1013 deadline, 1012 restart, 1002/1007/1009...)."""

    def backend_error(self, url: str) -> None: ...

    def backend_ejected(self, url: str) -> None: ...

    def messages(self, direction: str, count: int, nbytes: int) -> None:
        """``count`` messages of ``nbytes`` in all went ``direction`` ("to_backend" or "to_client")."""

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type for GET /metrics."""
        return b"", "text/plain; version=0.0.4; charset=utf-8"
