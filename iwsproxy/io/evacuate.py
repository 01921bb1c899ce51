"""A process in a fleet: sessions resumed from any process, moved on request, evacuated on shutdown.

:class:`Fleet` joins a :class:`~iwsproxy.io.manager.PipeManager` to the session directory in
Redis (:mod:`iwsproxy.io.fleet`):

* **Resume anywhere.** A client that connects with the id of a session this process does not hold
  takes it from the directory: a session at rest (evacuated) is adopted here
  (:meth:`PipeManager.adopt_session <iwsproxy.io.manager.PipeManager.adopt_session>`) and the
  connection resumes it; a session held by another live process is *moved* here: that process
  is asked to hand it over (it evacuates that one session: its client, if still attached, gets
  4409 as in a takeover), and the snapshot it saves is adopted. A session is moved rather than
  relayed: a relay would keep every message of the session crossing two proxies and an internal
  hop for the rest of its life, and would keep the holder's host needed (a drained host could
  not leave until its relayed clients did); a move costs one backend reconnect, as a failover,
  once, and reuses the evacuation of one session.
* **Evacuation** on shutdown (:meth:`evacuate`): every session is closed on both sides with
  their Close replies awaited (client 1012, backend 1001), and saved at rest for the resume
  grace, within ``evacuate_max_bytes`` and the shutdown's time; the sessions that cannot be
  saved (Redis failing, the cap reached, time up) are lost as in a plain 1012 shutdown, logged
  and counted.

Counters (``/admin/status``) and the metric ``iwsproxy_fleet_events{event}``: ``evacuated``
(saved at rest), ``evacuation_failed`` (lost), ``resumed_from_rest`` (taken at rest),
``moved_in`` (taken from a live holder, waited for: a move, or a resume that came while its
holder was still evacuating it), ``moved_out``, ``move_failed``, ``directory_errors`` (Redis
failed while a client connected: served here as a new session).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent
from gevent.queue import Empty, Queue

from ..exceptions import CapacityExceeded, IwsProxyError, ResumeRefused
from ..tokens import verify
from .fleet import RedisError, SessionDirectory
from .pipe import PersistentPipe, short_id
from .supervisor import CLOSE_TAKEN_OVER

if TYPE_CHECKING:
    from .client import ClientUpgrade
    from .manager import PipeManager

__all__ = ["Fleet", "EVACUATION_CODE", "FLEET_EVENTS"]

log = logging.getLogger(__name__)

EVACUATION_CODE = 1012
EVACUATION_REASON = "proxy shutting down: reconnect to resume"
MOVE_WAIT_S = 5.0              # how long a process waits for another to hand a session over
MOVE_CLOSE_S = 1.0             # how long a process handing a session over waits for the Close replies
SAVE_BATCH_BYTES = 1 << 20     # snapshots saved per round trip, at most (or SAVE_BATCH items)
SAVE_BATCH = 200
FLEET_EVENTS = ("evacuated", "evacuation_failed", "resumed_from_rest", "moved_in", "moved_out", "move_failed",
                "directory_errors")


class Fleet:
    """The fleet side of one :class:`PipeManager` (its ``fleet`` attribute)."""

    def __init__(self, manager: "PipeManager", directory: SessionDirectory):
        self.manager = manager
        self.directory = directory
        self.settings = manager.settings
        self._saving = manager._tasks  # owned by the manager: its shutdown kills them

    def start(self) -> None:
        self.directory.start(self._release_asked)

    def stop(self) -> None:
        self.directory.stop()

    def count(self, event: str, n: int = 1) -> None:
        self.manager.counters[event] += n
        self.manager.metrics.fleet_event(event, n)

    # ---- resume anywhere ----
    def resume_here(self, key: str, client_id: str, upgrade: "ClientUpgrade", token: str | None) -> bool:
        """Take session ``key`` from the fleet and resume it with ``upgrade``; False if the fleet has
        no such session (the caller opens a new one, recorded as held here).

        Raises :class:`ResumeRefused` for a session that exists without a valid token (403),
        :class:`CapacityExceeded` (503) if its holder did not hand it over in time, and what
        :meth:`PipeManager._rejoin` raises.
        """
        directory, secret = self.directory, self.settings.resume_secret
        try:
            if secret and not verify(secret, client_id, token):
                if directory.known(key):
                    raise ResumeRefused(f"resuming client {short_id(client_id)} needs a valid token")
                directory.hold(key)
                return False
            kind, value = directory.take(key)
            moved = kind == "held"
            if moved:
                value = self._move_from(str(value), key)
                kind = "snapshot" if value is not None else "new"
        except RedisError as exc:
            log.warning("session directory unreachable, serving client %s here: %s", short_id(client_id), exc)
            self.count("directory_errors")
            directory.hold(key)
            return False
        if kind == "new":
            return False
        try:
            pipe = self.manager.adopt_session(value)
        except IwsProxyError as exc:
            log.warning("client %s: the session from the fleet could not be adopted: %s", short_id(client_id), exc)
            return False
        if pipe is None:
            return False  # it ended at rest: a new session
        self.count("moved_in" if moved else "resumed_from_rest")
        self.manager._rejoin(pipe, upgrade, token)
        return True

    def _move_from(self, holder: str, key: str) -> bytes | None:
        """The snapshot of ``key`` once ``holder`` has handed it over; None if the holder is this
        process (a record not yet deleted) or dead (the record is dropped). CapacityExceeded if it
        did not hand it over within MOVE_WAIT_S or another process took it first."""
        directory = self.directory
        if holder == directory.id:
            return None
        if not directory.alive(holder):
            log.info("session %s: its holder %s is gone", short_id(key), holder)
            directory.forget_holder(key, holder)
            kind, value = directory.take(key)
            if kind == "snapshot":
                return value
            if kind == "new" or value == directory.id:
                return None
            return self._not_handed(key)
        directory.ask_release(holder, key)
        deadline = time.monotonic() + MOVE_WAIT_S
        while directory.wait_saved(key, max(0.0, deadline - time.monotonic())):
            kind, value = directory.take(key)
            if kind == "snapshot":
                return value
            if kind == "new":
                return None  # its holder let it go without saving it: recorded as ours, a new session
            if value != holder or time.monotonic() >= deadline:
                break  # another process took it first
        return self._not_handed(key)

    def _not_handed(self, key: str):
        self.count("move_failed")
        raise CapacityExceeded("the session is held by another proxy process that did not hand it over", 503)

    # ---- moving a session out ----
    def _release_asked(self, key: str) -> None:
        """Another process has a connection for session ``key``: hand it over if we hold it."""
        pipe = self.manager._pipes.get(key)
        if pipe is None or pipe.ending or not pipe.running or pipe._evacuation is not None:
            return
        if pipe.client_attached and self.settings.on_duplicate == "refuse":
            log.info("pipe %s: not handed over: attached, and duplicates are refused", short_id(pipe.client_id))
            return
        log.info("pipe %s: handing the session over to another process", short_id(pipe.client_id))
        # the old connection is being replaced: as in a takeover it is not waited for long (what it
        # had not acknowledged goes to the new one)
        pipe.evacuate(CLOSE_TAKEN_OVER, "session taken over by a connection to another proxy", MOVE_CLOSE_S,
                      lambda p, snapshot: self._save_moved(key, p, snapshot))

    def _save_moved(self, key: str, pipe: PersistentPipe, snapshot: bytes | None) -> None:
        if snapshot is None:
            self.count("move_failed")
            return
        try:
            if self.directory.save([(key, snapshot)], self.settings.resume_grace_s):
                raise RedisError("refused by Redis")
            self.count("moved_out")
        except RedisError as exc:
            log.error("pipe %s: the session could not be handed over (Redis: %s); it is lost",
                      short_id(pipe.client_id), exc)
            self.count("move_failed")
            self.directory.let_go(key)

    # ---- evacuation ----
    def evacuate(self, pipes: list[PersistentPipe], keys: dict, timeout_s: float) -> list[PersistentPipe]:
        """Evacuate ``pipes`` (``keys``: pipe -> session key) within ``timeout_s``; returns the
        pipes that were not asked to (their caller closes them with 1012)."""
        settings = self.settings
        deadline = time.monotonic() + timeout_s
        cap = settings.evacuate_max_bytes
        if not cap or not settings.resume_grace_s:
            return pipes
        if not self.directory.ping():
            log.error("evacuation: Redis is unreachable: %d sessions close with 1012 and are lost", len(pipes))
            self.count("evacuation_failed", len(pipes))
            return pipes
        done: Queue = Queue()
        asked, left = [], []
        close_within = max(0.1, min(settings.pong_timeout_s or 10.0, timeout_s / 2))
        for pipe in pipes:
            if pipe.running and not pipe.ending:
                pipe.evacuate(EVACUATION_CODE, EVACUATION_REASON, close_within,
                              lambda p, snapshot: done.put((p, snapshot)))
                asked.append(pipe)
            else:
                left.append(pipe)
        saved = failed = written = 0
        redis_failed = False
        waiting = len(asked)
        batch: list[tuple[str, bytes]] = []
        batch_bytes = 0

        def flush() -> None:
            nonlocal saved, failed, written, redis_failed, batch, batch_bytes
            if not batch:
                return
            if redis_failed or time.monotonic() >= deadline:
                failed += len(batch)
            else:
                try:
                    with gevent.Timeout(max(0.0, deadline - time.monotonic()), RedisError("shutdown time up")):
                        refused = self.directory.save(batch, settings.resume_grace_s)
                    saved += len(batch) - len(refused)
                    failed += len(refused)
                    written += batch_bytes
                except RedisError as exc:
                    log.error("evacuation: saving %d sessions failed: %s", len(batch), exc)
                    redis_failed = True
                    failed += len(batch)
            batch, batch_bytes = [], 0

        while waiting:
            try:
                pipe, snapshot = done.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                break
            waiting -= 1
            if snapshot is None:
                failed += 1
                continue
            if written + batch_bytes + len(snapshot) > cap:
                failed += 1
                continue
            batch.append((keys[pipe], snapshot))
            batch_bytes += len(snapshot)
            if len(batch) >= SAVE_BATCH or batch_bytes >= SAVE_BATCH_BYTES or done.empty():
                flush()
        flush()
        failed += waiting  # not even closed in time
        self.count("evacuated", saved)
        if failed:
            self.count("evacuation_failed", failed)
            log.error("evacuation: %d sessions could not be saved (Redis failing, %d-byte cap, or time up): "
                      "they are lost", failed, cap)
        log.info("evacuation: %d sessions saved to Redis (%d bytes), %d lost, in %.2f s", saved, written, failed,
                 timeout_s - max(0.0, deadline - time.monotonic()))
        return left
