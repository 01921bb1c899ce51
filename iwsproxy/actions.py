"""What a :class:`~iwsproxy.session.Session` tells the I/O layer to do: actions.  [pure]

Each action is a small frozen class, an imperative the runner performs in the order the
session returned it. ``side`` names the connection an action writes to or closes ("backend",
"client", or None), which decides the write lock it is performed under (see
:mod:`iwsproxy.io.locks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .buffer import Message

__all__ = ["SendToBackend", "SendToClient", "CloseClient", "CloseBackend", "AbandonBackend", "ReleaseBackend",
           "ConnectBackend", "RecordFailover", "FailoverReport", "stuck_peer_to_drop"]


@dataclass(frozen=True, slots=True)
class SendToBackend:
    """Write ``messages`` to the current backend, then a Ping carrying ``fence`` if it is set.

    ``nbytes`` is their payload size, counted once by the session (it follows from ``messages``).
    """
    side: ClassVar[str] = "backend"  # the side an action writes to or closes (None: neither)
    messages: list[Message]
    fence: int | None = None
    nbytes: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Write ``messages`` to the attached client, then a Ping carrying ``fence`` if it is set.

    ``nbytes`` is their payload size, counted once by the session (it follows from ``messages``).
    """
    side: ClassVar[str] = "client"
    messages: list[Message]
    fence: int | None = None
    nbytes: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Close the attached client with ``code``."""
    side: ClassVar[str] = "client"
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class CloseBackend:
    """End the backend connection politely (send Close, wait briefly for the reply)."""
    side: ClassVar[str] = "backend"
    generation: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class AbandonBackend:
    """The backend is considered dead: drop its connection at once, count it as a failure of
    that backend, and fail over."""
    side: ClassVar[str] = "backend"
    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class ReleaseBackend:
    """The backend connection is done with, through no fault of the backend (a completed drain,
    a session it ended): drop it and give its slot back."""
    side: ClassVar[str] = "backend"
    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectBackend:
    """Try the pool's backends once each, in the pool's order, and report the outcome with
    :meth:`Session.backend_connected` or :meth:`Session.connect_failed`. ``avoid`` (the backend
    just lost) is left out of this round unless it is the only backend."""
    side: ClassVar[None] = None
    avoid: str | None = None


@dataclass(frozen=True, slots=True)
class RecordFailover:
    """A failover completed: log and count ``report``."""
    side: ClassVar[None] = None
    report: "FailoverReport"


@dataclass(frozen=True, slots=True)
class FailoverReport:
    """What the last completed failover did, for logs and metrics."""
    duration_s: float
    replayed: int
    flushed_messages: int
    flushed_bytes: int
    from_url: str | None = None
    to_url: str | None = None
    cause: str = ""


def stuck_peer_to_drop(*, client_stuck: bool, backend_stuck: bool) -> str | None:
    """Which peer's connection to drop when writes to it took no byte for a pong timeout.

    When both are stuck the client goes first: a client that stopped reading is the usual cause,
    the backend then being blocked writing to us (dropping the client frees it). None: neither.
    """
    if client_stuck:
        return "client"
    return "backend" if backend_stuck else None
