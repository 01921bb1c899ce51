"""What a pipe's readers, timers and callers tell its supervisor: typed events and the mailbox.

Each event is a small frozen class. Readers and outside callers post them with
:meth:`PersistentPipe._post <iwsproxy.io.pipe.PersistentPipe>`; the supervisor takes
them one at a time, in the order they came, and turns each into session inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from gevent.event import Event

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["BackendLost", "BackendClosed", "BackendPinged", "ClientGone", "ClientArrived", "DrainAsked",
           "StopAsked", "PerformAsked", "MoveAsked", "EvacuateAsked", "Woken", "Rescheduled", "PipeEvent", "Mailbox"]


@dataclass(frozen=True, slots=True)
class BackendLost:
    """The backend connection of ``generation`` failed (error, EOF, failed write, protocol error)."""
    generation: int
    cause: str


@dataclass(frozen=True, slots=True)
class BackendClosed:
    """The backend of ``generation`` sent a Close frame with ``code`` (1005 if it had none)."""
    generation: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class BackendPinged:
    """The backend of ``generation`` sent a Ping: it is answered by the supervisor (the writer)."""
    generation: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ClientGone:
    """A client connection ended with ``code``: 1006 without a Close frame, else the code it sent
    (1005 for a Close without one) or the code the proxy closed it with for a protocol error."""
    client: "Connection"
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ClientArrived:
    """A new connection for this pipe's client id (a resume or a takeover)."""
    client: "Connection"


@dataclass(frozen=True, slots=True)
class DrainAsked:
    """Move off the backend at ``url`` without loss (if the pipe is on it)."""
    url: str


@dataclass(frozen=True, slots=True)
class StopAsked:
    """End the session, closing the client with ``code``."""
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class EvacuateAsked:
    """Hand the session over to another process: close the client with ``code`` and the backend
    with 1001, read until their Close replies (or ``deadline``, on the pipe's clock), then give
    the snapshot to ``on_done(pipe, snapshot)`` and end (see :meth:`PersistentPipe.evacuate
    <iwsproxy.io.pipe.PersistentPipe.evacuate>`)."""
    code: int
    reason: str
    deadline: float
    on_done: object


@dataclass(frozen=True, slots=True)
class PerformAsked:
    """Session actions a greenlet could not perform itself: it did not hold the write lock of
    their side (see :mod:`iwsproxy.io.locks`)."""
    actions: tuple


@dataclass(frozen=True, slots=True)
class MoveAsked:
    """Move the pipe to another process: ``send(state, fds) -> bool`` gives it away, and
    ``result`` (an ``AsyncResult``) is set to the outcome (see ``Movable.move``)."""
    send: object
    result: object


@dataclass(frozen=True, slots=True)
class Woken:
    """The pool changed: a pipe waiting for a backend tries again now."""


@dataclass(frozen=True, slots=True)
class Rescheduled:
    """Nothing happened, but the supervisor's next deadline may have moved: look again."""


PipeEvent = Union[BackendLost, BackendClosed, BackendPinged, ClientGone, ClientArrived, DrainAsked, StopAsked,
                  PerformAsked, MoveAsked, EvacuateAsked, Woken, Rescheduled]
RESCHEDULED = Rescheduled()
WOKEN = Woken()


class Mailbox:
    """The supervisor's inbox: a list and an Event (a gevent Queue costs three deques per pipe)."""

    __slots__ = ("_items", "_ready")

    def __init__(self) -> None:
        self._items: list[PipeEvent] = []
        self._ready = Event()

    def put(self, item: PipeEvent) -> None:
        self._items.append(item)
        self._ready.set()

    def __bool__(self) -> bool:
        return bool(self._items)

    def pending(self) -> list[PipeEvent]:
        """The events not yet taken, oldest first (a copy)."""
        return list(self._items)

    def take_all(self) -> list[PipeEvent]:
        items, self._items = self._items, []
        return items

    def get(self, timeout: float | None) -> PipeEvent | None:
        """The oldest item, waiting up to ``timeout`` for one; None if none came."""
        items = self._items
        if not items:
            self._ready.clear()
            self._ready.wait(timeout)
            if not items:
                return None
        return items.pop(0)
