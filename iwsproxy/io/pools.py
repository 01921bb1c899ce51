"""PoolLeases: one named backend pool, as the :class:`~iwsproxy.io.ports.BackendLeases` its pipes use."""

from __future__ import annotations

import time
from typing import Any

from ..pool import Backend, BackendPool
from .ports import Telemetry

__all__ = ["PoolLeases"]


class PoolLeases:
    """The backends of one pool (the default one, or a route's), leased to that pool's pipes.

    Failures are counted in ``telemetry`` and against the backend in this pool
    only. A pipe that waits for a backend is woken when this pool changes.
    """

    def __init__(self, name: str, pool: BackendPool, telemetry: Telemetry) -> None:
        self.name = name
        self.pool = pool
        self._telemetry = telemetry
        self._waiting: set[Any] = set()  # pipes woken when the pool changes

    def acquire_backend(self, exclude: set[str]) -> Backend | None:
        """A backend not in ``exclude``, counted as its client until :meth:`release_backend`."""
        return self.pool.acquire(time.monotonic(), exclude=exclude)

    def release_backend(self, backend: Backend, *, failed: bool, cause: str = "") -> None:
        now = time.monotonic()
        url = backend.url
        current = self.pool.get(url) is backend  # not one removed since (even if its URL is back)
        self.pool.release(backend)  # may remove a draining backend: asked before
        if failed and current:
            self._telemetry.count("backend_errors")
            self._telemetry.metrics.backend_error(url)
            if self.pool.record_failure(url, now, cause):
                self._telemetry.metrics.backend_ejected(url)
        self.wake_waiting()

    def backend_succeeded(self, url: str) -> None:
        self.pool.record_success(url, time.monotonic())

    def pool_size(self) -> int:
        return len(self.pool)

    def wait_for_backend(self, pipe: Any) -> None:
        self._waiting.add(pipe)

    def stop_waiting(self, pipe: Any) -> None:
        self._waiting.discard(pipe)

    def wake_waiting(self) -> None:
        """Wake every pipe waiting for a backend of this pool."""
        for pipe in list(self._waiting):
            pipe.wake()
