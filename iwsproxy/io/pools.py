"""One named backend pool: :class:`PoolLeases` (as the pipes use it) and :class:`OnePool` (as its registry does)."""

from __future__ import annotations

import time
from typing import Any

from ..pool import Backend, BackendPool
from .ports import Telemetry

__all__ = ["OnePool", "PoolLeases"]


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


class OnePool:
    """One pool of a :class:`~iwsproxy.io.manager.PipeManager`, as that pool's registry sees it.

    A registry applies changes with ``apply_add(url)``, ``apply_remove(url)`` and
    ``apply_drain(url, window_s)`` and reads ``pool``, the way it does on the
    manager itself for the default pool; here each call goes to the pool ``name``.
    """

    def __init__(self, manager: Any, name: str) -> None:
        self._manager = manager
        self.name = name

    @property
    def pool(self) -> BackendPool:
        return self._manager.leases[self.name].pool

    def apply_add(self, url: str) -> bool:
        return self._manager.apply_add(url, self.name)

    def apply_remove(self, url: str) -> bool:
        return self._manager.apply_remove(url, self.name)

    def apply_drain(self, url: str, window_s: float) -> int | None:
        return self._manager.apply_drain(url, window_s, self.name)
