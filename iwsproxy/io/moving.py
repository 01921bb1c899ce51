"""Moving a live pipe to another process: its part in :class:`~iwsproxy.io.pipe.PersistentPipe`.

A pipe is moved by its supervisor, between two events, so that nothing else touches the
session meanwhile (:meth:`Movable.move`). The supervisor

1. pauses every reader at a safe point: each stops at its next read, so every message it
   parsed has been given to the session and every write it started has ended (bytes of a frame
   not yet complete stay in its connection's parser);
2. exports the session (:func:`iwsproxy.snapshot.export`), the client's and the backend's
   connection state (:meth:`Connection.export_state`) and what the pipe knows besides (client
   id, subprotocol, pool, offer);
3. gives all of it, with the two descriptors, to ``send`` and waits for the answer.

Accepted, the pipe lets go of its descriptors without closing the connections (the other
process has its own) and ends without a Close. Refused, or if something happened meanwhile (a
peer closed, an event came), the readers go on and nothing changed. The receiving process builds
the pipe again with :meth:`Movable.start_moved`.

A backend connection over TLS cannot move (Python cannot hand over its TLS state): the pipe moves
without it, and the receiving process reconnects a backend as after a loss, with replay.
"""

from __future__ import annotations

import logging
from typing import Callable

import gevent

from ..pool import Backend
from .backend import BackendConnection
from .connection import Connection
from .events import RESCHEDULED, WOKEN, BackendLost, MoveAsked
from .supervisor import short_id

__all__ = ["Movable", "PAUSE_TIMEOUT_S"]

log = logging.getLogger("iwsproxy.io.pipe")

PAUSE_TIMEOUT_S = 1.0  # readers that do not stop within this (waiting for room, say): try again later
_QUIET = (RESCHEDULED, WOKEN)  # events that a move may leave behind (the new process looks again anyway)


class Movable:
    """The moving part of :class:`~iwsproxy.io.pipe.PersistentPipe` (a base class of it)."""

    def move(self, send: Callable[[dict, list[int]], bool]):
        """Ask the supervisor to move this pipe (from any greenlet); returns an ``AsyncResult``
        set to ``"moved"``, ``"refused"`` (``send`` said no: the pipe goes on here), ``"ending"``
        (the session is over or closing: it ends here) or ``"later"`` (busy: ask again).

        ``send(state, fds)`` is called in the supervisor with the pipe's state (a dict of JSON
        values and bytes) and the descriptors it names; it returns True once the other process
        has taken them."""
        from gevent.event import AsyncResult

        result = AsyncResult()
        if self.ending:
            result.set("ending")
        elif not self._running:
            result.set("later")  # its first backend is being connected: the client is not answered yet
        else:
            self._post(MoveAsked(send, result))
        return result

    def _on_move(self, event: MoveAsked) -> None:
        """In the supervisor: pause, export, send; see the module docstring."""
        if self.ending:
            event.result.set("ending")
            return
        if len(self._client_readers) > (self.client is not None):
            event.result.set("later")  # an earlier connection is still closing (a takeover)
            return
        readers = [r for r in self._readers() if not r.finished]  # a lost backend's reader has ended
        for reader in readers:
            reader.pause()
        try:
            outcome = self._move_paused(event.send, readers)
        except Exception:
            log.exception("pipe %s: moving it failed", short_id(self.client_id))
            outcome = "refused"
        if outcome != "moved":
            for reader in readers:
                reader.unpause()
        event.result.set(outcome)

    def _move_paused(self, send, readers) -> str:
        with gevent.Timeout(PAUSE_TIMEOUT_S, False):
            while True:
                running = [r.greenlet for r in readers if r.greenlet is not None]
                if not running:
                    break
                if self._room is not None:
                    self._room.set()  # a reader waiting for room looks again (and stops)
                gevent.joinall(running)
        if any(r.greenlet is not None or r.finished for r in readers) or self.ending:
            return "later"  # a reader is still busy, or a peer went: its event is handled first
        if any(event not in _QUIET for event in self._events.pending()):
            return "later"
        state, fds = self._export_for_move()
        if not send(state, fds):
            return "refused"
        self._moved = True
        return "moved"

    def _export_for_move(self) -> tuple[dict, list[int]]:
        """The pipe's state for a move: ``snapshot`` (:func:`~iwsproxy.io.carry.export_pipe`),
        ``client`` and ``backend`` (each connection's :meth:`~Connection.export_state`, the
        backend's with its URL and subprotocol; None without one, or for a backend over TLS),
        and the descriptors of those given, client first."""
        from .carry import export_pipe  # late: carry imports the pipe module

        fds = []
        client = backend = None
        if self.client is not None:
            client = self.client.export_state()
            fds.append(self.client.sock.fileno())
        if self.backend is not None and self.backend.movable:
            backend = {**self.backend.export_state(), "url": self.backend.url,
                       "subprotocol": self.backend.subprotocol}
            fds.append(self.backend.sock.fileno())
        snapshot = export_pipe(self, getattr(self.leases, "name", "default"))
        return {"snapshot": snapshot, "client": client, "backend": backend}, fds

    def _release_moved(self) -> None:
        """After a move: let go of the descriptors (the connections live on elsewhere), the
        backend's lease and every timer; no Close is sent."""
        self._cancel_timer()
        if self.client is not None:
            self.client.let_go()
        if self.backend is not None:
            if self.backend.movable:
                self.backend.let_go()
            else:
                self.backend.abort()  # TLS: the new process connects a backend again
            self.backend = None
        for client in list(self._client_readers):
            client.abort()  # none but the current one, which has been let go of
        self._client_readers.clear()
        self._backend_reader = None
        lease, self._lease = self._lease, None
        if lease is not None:
            self.leases.release_backend(lease, failed=False)
        self.leases.stop_waiting(self)
        self._group.kill(block=False)
        log.info("pipe %s moved to another process", short_id(self.client_id))

    def start_moved(self, client: Connection | None, backend: BackendConnection | None,
                    lease: Backend | None) -> None:
        """Serve a pipe moved from another process, its session given to the constructor:
        ``client`` (None if detached) and ``backend`` (None if it had none, or one that could not
        move) on the descriptors it sent, their state loaded; ``lease`` is this process's count
        of ``backend`` in the pool (None if the pool does not know it). Returns at once."""
        session = self.session
        self._running = True
        if client is not None:
            self._use_client(client)
        if backend is not None:
            backend.stall_timeout_s = self._stall_timeout_s
            self.backend, self._lease = backend, lease
            self._spawn_backend_reader(backend, session.generation)
        elif lease is not None:
            self.leases.release_backend(lease, failed=False)
        if session.has_backend and backend is None:
            self._post(BackendLost(session.generation, "its connection could not move to this process (TLS)"))
        if session.needs_backend:
            self.leases.wait_for_backend(self)
        if self._park_after:
            self._park_at = self.clock() + self._park_after
        self._observe()
        self._post(RESCHEDULED)
