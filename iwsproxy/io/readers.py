"""A pipe's read loop for one connection, run in a greenlet only while the connection has traffic."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gevent.event import Event

from .connection import Connection, Parked

if TYPE_CHECKING:
    from .pipe import PersistentPipe

__all__ = ["Reader"]


class Reader:
    """Runs a pipe's read loop for one connection: in a greenlet while the connection
    has traffic, as an idle watcher while it is parked.

    ``target(conn, *args)`` returns when the connection is done with; if it is
    parked (:class:`Parked` raised from its read) a new greenlet runs it again
    when data arrives. Its greenlets belong to the pipe's group; a crash is reported to
    the pipe (``_crashed``), and so are parking (counted) and unparking (``_reader_unparked``).
    """

    __slots__ = ("conn", "_pipe", "_target", "_args", "greenlet", "finished", "reads_seen", "_done")

    def __init__(self, pipe: PersistentPipe, conn: Connection, target, *args):
        self.conn, self._pipe, self._target, self._args = conn, pipe, target, args
        self.greenlet = None
        self.finished = False
        self.reads_seen = -1   # the connection's read count at the supervisor's last look
        self._done: Event | None = None
        self._spawn()

    def _spawn(self) -> None:
        self.greenlet = self._pipe._group.spawn(self._run)
        self.greenlet.link_exception(self._pipe._crashed)

    def _run(self) -> None:
        parked = False
        try:
            self._target(self.conn, *self._args)
        except Parked:
            parked = True
        finally:
            self.greenlet = None
            if not parked:
                self.finished = True
                if self._done is not None:
                    self._done.set()
        if parked and not self.conn.paused:
            self._pipe.telemetry.count("readers_parked")
            self.conn.call_when_readable(self._unpark)

    def _unpark(self) -> None:
        self.conn.resume(self._pipe._reader_unparked)  # a lone pong parks it again by itself
        self._spawn()

    def park(self) -> None:
        """Let go of the greenlet if it is waiting for data (else nothing happens)."""
        self.conn.park()

    def pause(self) -> None:
        """Stop reading at a safe point (see :meth:`Connection.pause`); :attr:`greenlet` is None
        once it has stopped."""
        self.conn.pause()
        self.conn.stop_watching()  # parked and idle: stopped already

    def unpause(self) -> None:
        """Read again after :meth:`pause`."""
        self.conn.unpause()
        if self.greenlet is None and not self.finished:
            self._spawn()

    def wake(self) -> None:
        """Run again now if parked."""
        if self.conn.stop_watching():
            self._spawn()

    def wait_finished(self, timeout: float) -> bool:
        if self.finished:
            return True
        if self._done is None:
            self._done = Event()
        return self._done.wait(timeout)
