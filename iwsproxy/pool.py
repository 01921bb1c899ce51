"""The backend pool: backends, their states, selection policies, ejection.

Pure: no I/O and no clock. Every method that depends on time takes ``now``, a
``time.monotonic()`` reading made by the caller; randomness comes from an
injected ``random.Random``. One pool is shared by all pipes of a process; the
I/O layer calls it from greenlets without yielding in between, so it needs no
locks.

States (vocabulary from HAProxy and Envoy). A backend has two independent states,
and every change records its cause in ``last_change``:

* **health** (operational): ``UP``, or ``EJECTED`` until ``ejected_until``.
  ``max_failures`` consecutive failures eject a backend for
  :func:`~iwsproxy.backoff.eject_duration` (growing with each ejection in a row).
  Once that time has passed the backend is usable again as a **probe**: it keeps
  health ``EJECTED`` and gets one chance. The first success puts it ``UP`` (and
  resets its ejection count); the first failure ejects it again, for longer.
  Several pipes may probe at once; the first result decides.
* **admin**: ``READY``, or ``DRAINING``: takes no new pipes, and is removed when its
  last client is released. ``remove()`` instead drops a backend at once; pipes
  already on it keep their connection, and their later calls about it are no-ops
  (a URL added again is a new backend, with its own count of clients: a pipe
  releases the :class:`Backend` that :meth:`BackendPool.acquire` gave it).

Selection (``acquire``). Among the *usable* backends (admin ``READY``, and ``UP`` or
with an expired ejection) not in ``exclude``:

* ``round_robin``: the next one after the previous pick, in insertion order.
* ``least_connections``: those with the fewest clients; ties go round-robin.
* ``exclusive``: only those with no client at all (one client per backend), in
  round-robin order; ``None`` when all are busy.

The round-robin cursor is a position in insertion order, so it survives adds and
removes (even removal of the backend it points at).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .backoff import eject_duration

__all__ = ["POLICIES", "Health", "Admin", "Backend", "BackendPool"]

log = logging.getLogger(__name__)

POLICIES = ("round_robin", "least_connections", "exclusive")


class Health(str, Enum):
    """Operational state, decided by the pool from successes and failures."""

    UP = "up"
    EJECTED = "ejected"


class Admin(str, Enum):
    """Administrative state, decided by an operator."""

    READY = "ready"
    DRAINING = "draining"


@dataclass
class Backend:
    """One backend URL and everything the pool knows about it."""

    url: str
    health: Health = Health.UP
    admin: Admin = Admin.READY
    clients: int = 0  # pipes currently assigned
    consecutive_failures: int = 0
    total_failures: int = 0
    ejections: int = 0  # ejections in a row, reset when the backend comes back UP
    ejected_until: float | None = None  # set exactly while health is EJECTED
    last_error: str | None = None
    last_change: str = "added"  # cause of the last state change

    def usable(self, now: float) -> bool:
        """Can take a new pipe: READY, and UP or ejected no longer (a probe)."""
        if self.admin is not Admin.READY:
            return False
        return self.health is Health.UP or (
            self.ejected_until is not None and self.ejected_until <= now
        )

    def to_dict(self, now: float) -> dict[str, Any]:
        """The admin API's view. ``state`` is "draining" if draining, else the health;
        ``ejected_for_s`` is the ejection time left (0.0 once it may be probed), or
        None when not ejected."""
        ejected_for_s = None
        if self.ejected_until is not None:
            ejected_for_s = round(max(0.0, self.ejected_until - now), 3)
        return {
            "url": self.url,
            "state": Admin.DRAINING.value if self.admin is Admin.DRAINING else self.health.value,
            "admin": self.admin.value,
            "health": self.health.value,
            "clients": self.clients,
            "consecutive_failures": self.consecutive_failures,
            "total_failures": self.total_failures,
            "ejections": self.ejections,
            "ejected_for_s": ejected_for_s,
            "last_error": self.last_error,
            "last_change": self.last_change,
        }


class BackendPool:
    """The backends of one process and the policy that assigns them to pipes.

    See the module docstring for states, probing and the selection policies.
    """

    def __init__(
        self,
        *,
        policy: str = "round_robin",
        max_failures: int = 3,
        eject_base_s: float = 1.0,
        eject_max_s: float = 60.0,
        rng: random.Random | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}, expected one of {', '.join(POLICIES)}")
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        if not 0 < eject_base_s <= eject_max_s:
            raise ValueError(
                f"need 0 < eject_base_s <= eject_max_s, got {eject_base_s} and {eject_max_s}"
            )
        self.policy = policy
        self.max_failures = max_failures
        self.eject_base_s = eject_base_s
        self.eject_max_s = eject_max_s
        self._rng = random.Random() if rng is None else rng
        self._backends: dict[str, Backend] = {}  # insertion order
        self._position: dict[str, int] = {}  # url -> insertion position, never reused
        self._next_position = 0
        self._cursor = -1  # position of the last pick

    # -- membership -------------------------------------------------------------

    def add(self, url: str) -> bool:
        """Add ``url`` (exact string match). False if already present, except that
        re-adding a DRAINING backend makes it READY again (in place) and returns True."""
        backend = self._backends.get(url)
        if backend is None:
            self._backends[url] = Backend(url)
            self._position[url] = self._next_position
            self._next_position += 1
            return True
        if backend.admin is Admin.DRAINING:
            backend.admin = Admin.READY
            backend.last_change = "re-added while draining"
            return True
        return False

    def remove(self, url: str) -> bool:
        """Drop ``url`` now, even with clients. False if absent."""
        if url not in self._backends:
            return False
        del self._backends[url]
        del self._position[url]
        return True

    def drain(self, url: str) -> bool:
        """Take no new pipes on ``url``; remove it once its last client is released
        (at once if it has none). False if absent."""
        backend = self._backends.get(url)
        if backend is None:
            return False
        backend.admin = Admin.DRAINING
        backend.last_change = "drain requested"
        if backend.clients == 0:
            self.remove(url)
        return True

    def __contains__(self, url: object) -> bool:
        return url in self._backends

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, url: str) -> Backend | None:
        return self._backends.get(url)

    def urls(self) -> list[str]:
        """All URLs, draining ones included, in insertion order."""
        return list(self._backends)

    # -- assignment -------------------------------------------------------------

    def acquire(self, now: float, *, exclude: Collection[str] = ()) -> Backend | None:
        """Pick a backend for one pipe by the pool's policy and count the pipe as its
        client. None if no usable backend outside ``exclude`` fits the policy (the
        caller decides whether to wait, see :meth:`next_change_at`, or to clear
        ``exclude``)."""
        candidates = [
            b for b in self._backends.values() if b.usable(now) and b.url not in exclude
        ]
        if self.policy == "least_connections" and candidates:
            fewest = min(b.clients for b in candidates)
            candidates = [b for b in candidates if b.clients == fewest]
        elif self.policy == "exclusive":
            candidates = [b for b in candidates if b.clients == 0]
        if not candidates:
            return None
        backend = self._after_cursor(candidates)
        self._cursor = self._position[backend.url]
        backend.clients += 1
        return backend

    def _after_cursor(self, candidates: list[Backend]) -> Backend:
        """The first candidate after the cursor in insertion order, wrapping around."""
        for backend in candidates:
            if self._position[backend.url] > self._cursor:
                return backend
        return candidates[0]

    def release(self, backend: Backend) -> None:
        """A pipe left ``backend`` (as :meth:`acquire` returned it). Removes a DRAINING backend
        whose last client this was. A backend removed since is ignored, even if its URL has been
        added again (that is another backend, whose clients this pipe never was)."""
        if self._backends.get(backend.url) is not backend:
            return
        backend.clients = max(0, backend.clients - 1)
        if backend.admin is Admin.DRAINING and backend.clients == 0:
            self.remove(backend.url)

    # -- health -----------------------------------------------------------------

    def record_success(self, url: str, now: float) -> None:
        """A pipe connected to ``url``: the failure run ends; an ejected backend is UP."""
        backend = self._backends.get(url)
        if backend is None:
            return
        backend.consecutive_failures = 0
        if backend.health is Health.EJECTED:
            backend.health = Health.UP
            backend.ejected_until = None
            backend.ejections = 0
            backend.last_change = "probe succeeded"
            log.info("backend %s is up again: probe succeeded", url)

    def record_failure(self, url: str, now: float, error: str) -> bool:
        """Count a failure on ``url``; True if it ejected the backend.

        Ejects after ``max_failures`` consecutive failures of an UP backend, or after
        one failure of a probe (ejection expired). A failure reported while the
        ejection still runs (from a pipe that started earlier) is only counted.
        The pool logs each ejection at WARNING; callers need not log it again.
        """
        backend = self._backends.get(url)
        if backend is None:
            return False
        backend.consecutive_failures += 1
        backend.total_failures += 1
        backend.last_error = error
        if backend.health is Health.UP:
            if backend.consecutive_failures < self.max_failures:
                return False
            cause = f"{backend.consecutive_failures} consecutive failures"
        elif backend.ejected_until is not None and backend.ejected_until <= now:
            cause = "probe failed"
        else:
            return False
        backend.ejections += 1
        duration_s = eject_duration(
            backend.ejections, base_s=self.eject_base_s, max_s=self.eject_max_s, rng=self._rng
        )
        backend.health = Health.EJECTED
        backend.ejected_until = now + duration_s
        backend.last_change = f"ejected for {duration_s:.1f}s after {cause}: {error}"
        log.warning("backend %s %s", url, backend.last_change)
        return True

    # -- views ------------------------------------------------------------------

    def next_change_at(self, now: float) -> float | None:
        """When the earliest pending ejection of a READY backend ends (so a waiter
        knows when to look again); None if none is pending."""
        pending = [
            b.ejected_until
            for b in self._backends.values()
            if b.admin is Admin.READY and b.ejected_until is not None and b.ejected_until > now
        ]
        return min(pending, default=None)

    def usable_count(self, now: float) -> int:
        """How many backends could take a new pipe now (ignoring the policy)."""
        return sum(b.usable(now) for b in self._backends.values())

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """``to_dict`` of every backend, in insertion order."""
        return [b.to_dict(now) for b in self._backends.values()]
