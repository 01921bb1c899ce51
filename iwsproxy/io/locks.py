"""A pipe's write locks, and the one concurrency rule of a pipe.

**The rule.** A session call and the writes it leads to happen together: an action the
session returns for one side (a send, a Close, dropping the connection) is performed only by
a greenlet that holds that side's :class:`WriteLock`. A greenlet given an action for a side
whose lock it does not hold hands it to the supervisor, which takes the lock (see
``PersistentPipe._perform``). So the order in which the session decided is the order on the
wire, whoever called it.

Session calls never yield, so each is atomic between greenlet switches; calls that return no
action (a Pong, a query) need no lock. The backend reader never takes the backend lock (a
writer blocked on a backend that is itself blocked writing to us would deadlock), and a client
reader never takes the client lock; only the supervisor takes both, backend first, through
:meth:`WriteLocks.holding`, which never waits on a peer that has stopped reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from gevent import get_hub, getcurrent
from gevent.lock import Semaphore

from ..session import stuck_peer_to_drop
from .connection import Connection

__all__ = ["WriteLock", "WriteLocks"]


class WriteLock:
    """A lock that knows which greenlet holds it."""

    __slots__ = ("_semaphore", "owner")

    def __init__(self) -> None:
        self._semaphore = Semaphore()
        self.owner = None

    def acquire(self, timeout: float | None = None) -> bool:
        if not self._semaphore.acquire(timeout=timeout):
            return False
        self.owner = getcurrent()
        return True

    def release(self) -> None:
        self.owner = None
        self._semaphore.release()

    def locked(self) -> bool:
        return self._semaphore.locked()

    def held_here(self) -> bool:
        """Does the calling greenlet hold it?"""
        return self.owner is getcurrent()

    def __enter__(self) -> "WriteLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LockOwner(Protocol):
    """What :meth:`WriteLocks.holding` needs of the pipe: its current connections (either None)
    and what to do with a peer that took none of our bytes for a ``timeout_s`` (``drop_stuck``
    aborts it, which fails the stuck write and frees its lock)."""
    client: Connection | None
    backend: Connection | None

    def drop_stuck(self, side: str, conn: Connection) -> None: ...


class WriteLocks:
    """The backend's and the client's write lock of one pipe. It keeps no reference to the pipe
    (the pipe is given to :meth:`holding`), so a pipe and its locks are freed by reference
    counting."""

    __slots__ = ("backend", "client", "supervisor_waits", "timeout_s")

    def __init__(self, timeout_s: float):
        self.backend = WriteLock()
        self.client = WriteLock()
        self.supervisor_waits = False  # readers yield between writes while it is True
        self.timeout_s = timeout_s

    def for_side(self, side: str) -> WriteLock:
        return self.backend if side == "backend" else self.client

    @contextmanager
    def holding(self, owner: LockOwner, *, backend: bool = False, client: bool = False) -> Iterator[None]:
        """Hold the write locks of the given sides (the backend's first), never waiting on a
        peer of ``owner`` that has stopped reading.

        While waiting for a lock, and while holding them and writing (a replay, a flush, a
        Close), every ``timeout_s`` it looks at the writes under way: one that took no byte
        since the last look is stuck on a peer that stopped reading, and that peer is dropped
        (:func:`~iwsproxy.session.stuck_peer_to_drop` chooses when both are). A slow peer that
        takes bytes is waited for. With ``timeout_s`` 0 the waits have no limit.
        """
        held = []
        timeout = self.timeout_s
        seen: dict = {}
        watchdog = None
        try:
            for wanted, lock in ((backend, self.backend), (client, self.client)):
                if wanted:
                    self._take(lock, timeout, seen, owner)
                    held.append(lock)
            if timeout:
                self._note_writes(seen, owner)
                watchdog = get_hub().loop.timer(timeout, timeout)
                watchdog.start(self._drop_stuck_writes, seen, owner)
            yield
        finally:
            if watchdog is not None:
                watchdog.close()
            for lock in reversed(held):
                lock.release()

    def _take(self, lock: WriteLock, timeout: float, seen: dict, owner: LockOwner) -> None:
        if not timeout:
            lock.acquire()
            return
        self.supervisor_waits = True
        try:
            self._note_writes(seen, owner)
            while not lock.acquire(timeout=timeout):
                self._drop_stuck_writes(seen, owner)
        finally:
            self.supervisor_waits = False

    @staticmethod
    def _note_writes(seen: dict, owner: LockOwner) -> None:
        """Note in ``seen`` where each connection's writes stand."""
        client, backend = owner.client, owner.backend
        seen.clear()
        for side, conn in (("client", client), ("backend", backend)):
            if conn is not None:
                seen[side] = (conn, conn.progress)

    def _drop_stuck_writes(self, seen: dict, owner: LockOwner) -> None:
        """Drop the peer (at most one) whose write is under way and has taken no byte since the
        last look, noted in ``seen``."""
        client, backend = owner.client, owner.backend

        def stuck(side: str, conn: Connection | None) -> bool:
            return conn is not None and conn.writing and seen.get(side) == (conn, conn.progress)

        side = stuck_peer_to_drop(client_stuck=stuck("client", client), backend_stuck=stuck("backend", backend))
        if side is not None:
            owner.drop_stuck(side, client if side == "client" else backend)
        self._note_writes(seen, owner)
