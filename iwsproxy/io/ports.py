"""What a pipe needs from the process around it, as narrow interfaces.

A :class:`~iwsproxy.io.pipe.PersistentPipe` is given a :class:`BackendLeases`
(the shared pool, through :class:`~iwsproxy.io.manager.PipeManager`), a
:class:`Telemetry` (counters and metrics), :class:`BackendOptions` (how to open
a backend connection) and a callback for its end. A test can build a pipe from
small stand-ins for these, with no manager.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..metrics import Metrics

if TYPE_CHECKING:
    from ..frames import MaskSource
    from ..pool import Backend
    from ..session import FailoverReport

__all__ = ["BackendLeases", "BackendOptions", "Telemetry"]


class BackendLeases(Protocol):
    """The backends a pipe may connect to, each lease counted until it is released."""

    def acquire_backend(self, exclude: set[str]) -> "Backend | None":
        """A backend not in ``exclude``, chosen by the pool's policy; None if none is usable."""

    def release_backend(self, backend: "Backend", *, failed: bool, cause: str = "") -> None:
        """Give a lease back; ``failed`` counts against the backend's health."""

    def backend_succeeded(self, url: str) -> None:
        """A handshake with ``url`` completed."""

    def pool_size(self) -> int:
        """How many backends the pool holds (usable or not)."""

    def wait_for_backend(self, pipe: Any) -> None:
        """Call ``pipe.wake()`` when the pool changes, until :meth:`stop_waiting`."""

    def stop_waiting(self, pipe: Any) -> None: ...


@dataclass(frozen=True)
class BackendOptions:
    """How a pipe opens backend connections: TLS options and the shared mask-key source."""
    sslopt: dict | None = None
    mask_source: "MaskSource | None" = None


class Telemetry:
    """What pipes report: counters for the status page and the Prometheus metrics."""

    __slots__ = ("metrics", "counters", "closed_by_code")

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.counters: Counter = Counter()
        self.closed_by_code: Counter = Counter()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def client_closed(self, code: int, cause: str | None = None) -> None:
        """The proxy closed a client with ``code`` for ``cause`` (the session's end cause)."""
        self.closed_by_code[code] += 1
        self.metrics.client_closed(code, cause)

    def resume_event(self, kind: str) -> None:
        self.counters[f"clients_{kind}"] += 1
        self.metrics.resume_event(kind)

    def failover(self, report: "FailoverReport") -> None:
        self.counters["failovers"] += 1
        self.counters["replayed"] += report.replayed
        self.metrics.failover(report.duration_s, report.replayed, report.flushed_bytes)
