"""Backend registries: where registrations, removals and drains are decided.

A registry turns an admin action into calls of the manager's ``apply_*``
methods, in this process and, for a shared registry, in every process that
uses it. :class:`LocalRegistry` is the embedded default: the process's own
pool is the whole truth. A shared registry (Redis, see
:mod:`iwsproxy.io.redis_registry`) stores the backend set and broadcasts each
change so every worker on every host applies it; error counts and ejection
stay per worker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from ..pool import Admin
from .backend import check_backend_url

if TYPE_CHECKING:
    from .manager import PipeManager

__all__ = ["Registry", "LocalRegistry", "drain_undone", "url_from_peer"]

log = logging.getLogger(__name__)


class Registry(Protocol):
    def start(self, manager: "PipeManager", backends: tuple[str, ...] = ()) -> None:
        """Begin applying changes to ``manager`` (and load the current set).

        ``backends`` are those given at start (settings, ``PipeManager(backends=...)``);
        the registry decides what they mean.
        """

    def add(self, url: str) -> bool:
        """Register ``url`` everywhere; True if it was new."""

    def remove(self, url: str) -> bool:
        """Unregister ``url`` everywhere; True if it was registered."""

    def drain(self, url: str, window_s: float) -> int | None:
        """Drain ``url`` everywhere; the number of this process's pipes to move, None if unknown."""

    def stop(self) -> None:
        """Stop listening for changes."""


class LocalRegistry:
    """The process's own pool is the registry: changes apply here and nowhere else."""

    def __init__(self) -> None:
        self._manager: "PipeManager | None" = None

    def start(self, manager: "PipeManager", backends: tuple[str, ...] = ()) -> None:
        """The backends given at start are added: this process is the only one to tell."""
        self._manager = manager
        for url in backends:
            manager.apply_add(url)

    def add(self, url: str) -> bool:
        return self._manager.apply_add(url)

    def remove(self, url: str) -> bool:
        return self._manager.apply_remove(url)

    def drain(self, url: str, window_s: float) -> int | None:
        return self._manager.apply_drain(url, window_s)

    def stop(self) -> None:
        self._manager = None


def drain_undone(own_drains: set[str], manager: "PipeManager", url: str) -> bool:
    """For a shared registry reading the echo of a drain it published itself (``url`` in
    ``own_drains``, which loses it): was that drain undone here meanwhile by an add published
    before it (and therefore older)? Then the drain wins and is applied again."""
    if url not in own_drains:
        return False
    own_drains.discard(url)
    backend = manager.pool.get(url)
    return backend is not None and backend.admin is Admin.READY


def url_from_peer(url: object, peer: str) -> bool:
    """True if ``url``, read from ``peer`` (Redis, the master...), is a backend URL this process
    accepts; otherwise False, with a warning."""
    try:
        check_backend_url(url)
    except ValueError as exc:
        log.warning("registry: ignoring backend %.200r from %s: %s", url, peer, exc)
        return False
    return True
