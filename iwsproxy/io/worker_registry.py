"""The backend registry of ``iwsproxy serve --workers N``, kept by the master process.

Each worker talks to the master over its own Unix socket pair (see
:mod:`iwsproxy.io.workers`), one JSON object per line:

* master -> worker, first: ``{"op": "set", "urls": [...]}``, the registered backends;
* worker -> master: ``{"op": "add" | "remove" | "drain", "url", "window_s"}``, an admin change
  made in that worker;
* master -> every worker, the origin included, in the order the master received them:
  the same change with ``"origin"`` (the slot of the worker that made it).

An admin call is applied in the worker that received it at once (so that its
answer reflects it), then sent to the master, which records it and passes it
on. Each worker applies the changes in the master's order, so all end with the
same set; re-applying an add or remove is harmless. A drain is not applied
twice where it began, unless an add read in between (published before the
drain) made the URL ready again: then the drain, the newer, is applied again.
A worker started later (a replacement) gets the master's set, not the backends
given at start. Error counts and ejection stay per worker.

If the master goes away (its end of the socket closes), the worker stops as on
SIGTERM: a worker without its master would never be restarted or stopped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

import gevent
from gevent.lock import Semaphore
from gevent.pool import Group

from .backend import check_backend_url
from .registry import drain_undone, url_from_peer

if TYPE_CHECKING:
    from .manager import PipeManager

__all__ = ["MasterLink", "WorkerRegistry"]

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024  # one change or the whole set; longer lines are a broken peer
SET_TIMEOUT_S = 10.0        # for the master's first message


class MasterLink:
    """A worker's end of its socket pair with the master: messages out (one writer at a time), lines
    in, and the master's going away, which stops this worker as SIGTERM does."""

    def __init__(self, channel: socket.socket):
        """``channel``: a gevent socket (the worker is monkey-patched before it makes this)."""
        self._channel = channel
        self._buffer = b""
        self._send_lock = Semaphore()
        self._group = Group()

    def send(self, message: dict) -> bool:
        """Send one message; False (logged) if the master cannot be reached."""
        data = json.dumps(message).encode() + b"\n"
        try:
            with self._send_lock:
                self._channel.sendall(data)
            return True
        except OSError as exc:
            log.warning("could not send %s to the master: %s", message.get("op"), exc)
            return False

    def next_line(self) -> bytes | None:
        """The next line from the master (without its newline); None once the master is gone."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE_BYTES:
                raise ValueError("line too long")
            chunk = self._channel.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def follow(self, on_line) -> None:
        """Call ``on_line(line)`` for each line, in a greenlet of this link's; when the master is
        gone, stop this worker (SIGTERM to itself)."""
        reader = self._group.spawn(self._follow, on_line)
        reader.link_exception(lambda g: log.error("reader of the master's channel crashed", exc_info=g.exc_info))

    def _follow(self, on_line) -> None:
        while True:
            try:
                line = self.next_line()
            except (OSError, ValueError) as exc:
                log.error("the channel to the master failed: %s", exc)
                line = None
            if line is None:
                log.warning("the master is gone: stopping this worker")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            on_line(line)

    def stop(self) -> None:
        self._group.kill(timeout=1)


class WorkerRegistry:
    """A worker's end of the master's registry (see the module docstring)."""

    def __init__(self, link: MasterLink, slot: int):
        """``link``: this worker's :class:`MasterLink`; ``slot``: this worker's number, as the
        master names it in the ``origin`` of changes."""
        self._link = link
        self._slot = slot
        self._manager: "PipeManager | None" = None
        self._own_drains: set[str] = set()  # drained here, their echo not read yet

    def start(self, manager: "PipeManager", backends: tuple[str, ...] = ()) -> None:
        """Load the master's set (``backends`` are ignored: the master was given them and seeded
        its set with them) and apply its changes from now on. Raises OSError or ValueError if the
        master sends no set within ``SET_TIMEOUT_S``, ValueError for a URL that is not a backend URL."""
        self._manager = manager
        with gevent.Timeout(SET_TIMEOUT_S, OSError("no backend set from the master")):
            line = self._link.next_line()
        if line is None:
            raise OSError("the master closed the channel before sending the backend set")
        message = json.loads(line)
        if message.get("op") != "set" or not isinstance(message.get("urls"), list):
            raise ValueError(f"expected the backend set first, got {line[:200]!r}")
        for url in message["urls"]:
            manager.apply_add(check_backend_url(url))  # (a bad URL given at start stops the worker)
        log.info("registry: %d backends from the master", len(message["urls"]))
        self._link.follow(self._apply)

    def add(self, url: str) -> bool:
        self._own_drains.discard(url)  # added back after a drain of ours: the add is the newer
        added = self._manager.apply_add(url)
        self._send({"op": "add", "url": url})
        return added

    def remove(self, url: str) -> bool:
        removed = self._manager.apply_remove(url)
        self._send({"op": "remove", "url": url})
        return removed

    def drain(self, url: str, window_s: float) -> int | None:
        moving = self._manager.apply_drain(url, window_s)
        if moving is not None:
            self._own_drains.add(url)
            self._send({"op": "drain", "url": url, "window_s": window_s})
        return moving

    def stop(self) -> None:
        self._link.stop()
        self._manager = None

    def _send(self, message: dict) -> None:
        if not self._link.send(message):
            log.warning("registry: %s %s applied in this worker only", message["op"], message["url"])

    def _apply(self, line: bytes) -> None:
        try:
            change = json.loads(line)
            op, url = change["op"], change["url"]
            window_s = float(change.get("window_s") or 0.0)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("registry: ignoring a malformed message %.200r: %s", line, exc)
            return
        manager = self._manager
        if manager is None or not self._valid(url):
            return
        if op == "add":
            manager.apply_add(url)
        elif op == "remove":
            manager.apply_remove(url)
        elif op == "drain":
            if change.get("origin") != self._slot or self._undone_here(url):
                manager.apply_drain(url, window_s)
        else:
            log.warning("registry: ignoring a message with unknown op %.200r", line)

    def _undone_here(self, url: str) -> bool:
        return drain_undone(self._own_drains, self._manager, url)

    @staticmethod
    def _valid(url: object) -> bool:
        return url_from_peer(url, "the master")
