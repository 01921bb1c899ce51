"""``iwsproxy serve --workers N``: a master process and N workers on one port.

The master binds the listening sockets, forks the workers, and then only
supervises: it serves no request and never imports gevent, so a worker starts
from a process with no event loop, no greenlet and no thread.

Sharing the port. The master binds one socket per worker slot, all on the same
address with ``SO_REUSEPORT`` (port 0 is resolved by the first), and keeps
them; worker ``i`` accepts on socket ``i``. The kernel spreads new connections
evenly over the sockets by a hash of their addresses. One socket shared by
every worker (a plain pre-fork) would let each worker's event loop race for
each connection, and with epoll the busiest loop tends to win most of them.
Because the master keeps every socket open, connections that arrive for a
worker that has died wait in its socket's backlog for its replacement instead
of being refused. Where ``SO_REUSEPORT`` is missing, one socket is shared.

The backend registry. Without ``--redis-url`` the master keeps the set of
registered backends and passes each admin change a worker makes on to every
worker (:mod:`iwsproxy.io.worker_registry`); a replacement worker starts with
the master's set. With ``--redis-url`` every worker uses the Redis registry.

The handoff directory. Workers pass a reconnecting client to the worker holding
its session through ``--handoff-dir`` (:mod:`iwsproxy.io.handoff`); if none is
set the master creates a private temporary one and removes it when it exits.

Signals. SIGTERM or SIGINT: the master passes SIGTERM to every worker (each
stops accepting and closes its clients with 1012), waits for them (SIGKILL
after ``stop_timeout_s``), and exits. SIGHUP is passed on to every worker, which
logs and ignores it: a worker's restart without a disconnect (:mod:`iwsproxy.io.handover`)
would start its successor from the master's command line, as a second master; to load
new code, restart the master (its clients get 1012 and reconnect). A
worker that exits while the master is not stopping is replaced, after a delay
that grows while replacements keep exiting within ``QUICK_EXIT_S`` of their
start; a worker that exits before the first ``ready`` of all of them makes the
master stop everything and exit with status 1 (a worker that cannot start at all
would otherwise be restarted forever). With ``PROMETHEUS_MULTIPROC_DIR`` set, an
exited worker is marked dead for the metrics, as ``iwsproxy.gunicorn_conf`` does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Master", "bind_listeners", "serve_worker", "private_handoff_dir"]

log = logging.getLogger(__name__)

BACKLOG = 1024
QUICK_EXIT_S = 5.0           # a worker that exits sooner than this after its start counts as failing
MAX_RESPAWN_DELAY_S = 5.0
CHANNEL_SEND_TIMEOUT_S = 2.0  # a worker that does not read its channel for this long is replaced
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def bind_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address: with ``SO_REUSEPORT`` one per worker, else one
    for all (a list of one). Port 0 is resolved by the first. Raises OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    listeners: list[socket.socket] = []
    try:
        for _ in range(count if reuse_port else 1):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            address = sock.getsockname()  # the port the first one got
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


@dataclass
class _Slot:
    number: int
    listener: socket.socket
    pid: int | None = None
    channel: socket.socket | None = None   # the master's end
    inbox: bytes = b""
    started_at: float = 0.0
    quick_exits: int = 0                    # exits within QUICK_EXIT_S of their start, in a row
    respawn_at: float | None = None
    ready: bool = False


@dataclass
class Master:
    """The master of ``count`` workers. ``worker_main(listener, channel, slot)`` runs in each forked
    worker and returns its exit status; ``ready(port)`` is called once every worker has first
    reported ready. ``backends`` seed the registry the master keeps (workers that use Redis
    ignore it)."""

    count: int
    bind: tuple[str, int]
    worker_main: Callable[[socket.socket, socket.socket, int], int]
    backends: tuple[str, ...] = ()
    ready: Callable[[int], None] | None = None
    stop_timeout_s: float = 15.0
    slots: list[_Slot] = field(default_factory=list)
    registered: dict[str, None] = field(default_factory=dict)  # the registry: URLs in insertion order
    all_ready_once: bool = False  # every worker has reported ready (the start is over)

    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM/SIGINT; the exit status."""
        self.registered = dict.fromkeys(self.backends)
        listeners = bind_listeners(*self.bind, self.count)
        self.port = listeners[0].getsockname()[1]
        self.slots = [_Slot(i, listeners[i % len(listeners)]) for i in range(self.count)]
        self._selector = selectors.DefaultSelector()
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        self._wake = (wake_read, wake_write)
        self._selector.register(wake_read, selectors.EVENT_READ)
        previous = {signum: signal.signal(signum, _noop) for signum in _FORWARDED}
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        self._stopping_since: float | None = None
        self._status = 0
        try:
            log.info("master %d: %d workers on %s:%d (%s)", os.getpid(), self.count, self.bind[0], self.port,
                     "one SO_REUSEPORT socket each" if len(listeners) > 1 else "one shared socket")
            for slot in self.slots:
                self._spawn(slot)
            self._loop()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._selector.close()
            os.close(wake_read)
            os.close(wake_write)
            for sock in listeners:
                sock.close()
            for slot in self.slots:
                if slot.channel is not None:
                    slot.channel.close()
        return self._status

    # ---- the loop ----
    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            if self._stopping_since is not None:
                if not any(slot.pid for slot in self.slots):
                    return
                if now - self._stopping_since > self.stop_timeout_s:
                    for slot in self.slots:
                        if slot.pid:
                            log.warning("worker %d (pid %d) still running after %.0f s: SIGKILL",
                                        slot.number, slot.pid, self.stop_timeout_s)
                            _signal(slot.pid, signal.SIGKILL)
                    self._stopping_since = now  # (then wait for their exit, reaped below)
            else:
                for slot in self.slots:
                    if slot.respawn_at is not None and slot.respawn_at <= now:
                        self._spawn(slot)
            for key, _ in self._selector.select(self._timeout(now)):
                if key.fd == self._wake[0]:
                    self._on_signals()
                else:
                    self._on_channel(key.data)

    def _timeout(self, now: float) -> float:
        deadlines = [slot.respawn_at for slot in self.slots if slot.respawn_at is not None]
        if self._stopping_since is not None:
            deadlines.append(self._stopping_since + self.stop_timeout_s)
        return max(0.0, min(deadlines) - now) if deadlines else 1.0

    def _on_signals(self) -> None:
        try:
            received = os.read(self._wake[0], 256)
        except BlockingIOError:
            return
        for signum in received:
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop()
            elif signum == signal.SIGHUP:
                log.info("SIGHUP: passed on to every worker (workers do not restart on it)")
                for slot in self.slots:
                    if slot.pid:
                        _signal(slot.pid, signal.SIGHUP)

    def stop(self, status: int = 0) -> None:
        """Stop: SIGTERM to every worker, none replaced; the loop ends when all have exited."""
        if self._stopping_since is not None:
            return
        log.info("stopping: SIGTERM to every worker")
        self._stopping_since = time.monotonic()
        self._status = status
        for slot in self.slots:
            slot.respawn_at = None
            if slot.pid:
                _signal(slot.pid, signal.SIGTERM)

    # ---- workers ----
    def _spawn(self, slot: _Slot) -> None:
        slot.respawn_at = None
        slot.ready = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                status = 1
                try:
                    ours.close()
                    self._forget_in_child(slot)
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                    status = self.worker_main(slot.listener, theirs, slot.number)
                except SystemExit as exc:
                    status = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    log.exception("worker %d failed", slot.number)
                finally:
                    logging.shutdown()
                    os._exit(status)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        ours.settimeout(CHANNEL_SEND_TIMEOUT_S)
        slot.pid, slot.channel, slot.inbox, slot.started_at = pid, ours, b"", time.monotonic()
        self._selector.register(ours, selectors.EVENT_READ, slot)
        log.info("worker %d started: pid %d", slot.number, pid)
        self._send(slot, {"op": "set", "urls": list(self.registered)})

    def _forget_in_child(self, slot: _Slot) -> None:
        """In a new worker: drop the master's signal handling and every descriptor that is not the
        worker's own, so that only the master holds the other workers' sockets."""
        signal.set_wakeup_fd(-1)
        for signum in _FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        self._selector.close()
        for fd in self._wake:
            os.close(fd)
        for other in self.slots:
            if other.channel is not None:
                other.channel.close()
            if other.listener is not slot.listener:
                other.listener.close()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._exited(slot, status)

    def _exited(self, slot: _Slot, status: int) -> None:
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {os.waitstatus_to_exitcode(status)}")
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # its gauges stop counting (its counters stay)
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(slot.pid)
        if slot.channel is not None:
            self._selector.unregister(slot.channel)
            slot.channel.close()
            slot.channel = None
        slot.pid = None
        if self._stopping_since is not None:
            log.info("worker %d exited (%s)", slot.number, how)
            return
        if not self.all_ready_once:
            log.error("worker %d exited (%s) before it was ready: stopping", slot.number, how)
            self.stop(status=1)
            return
        lived = time.monotonic() - slot.started_at
        slot.quick_exits = slot.quick_exits + 1 if lived < QUICK_EXIT_S else 0
        delay = min(0.1 * 2 ** slot.quick_exits, MAX_RESPAWN_DELAY_S) if slot.quick_exits else 0.0
        log.warning("worker %d exited (%s) after %.1f s: replacing it%s", slot.number, how, lived,
                    f" in {delay:.1f} s" if delay else "")
        slot.respawn_at = time.monotonic() + delay

    # ---- the channels ----
    def _on_channel(self, slot: _Slot) -> None:
        try:
            chunk = slot.channel.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            chunk = b""
            log.warning("worker %d: channel failed: %s", slot.number, exc)
        if not chunk:  # the worker is exiting: reaped on its SIGCHLD
            self._selector.unregister(slot.channel)
            slot.channel.close()
            slot.channel = None
            return
        slot.inbox += chunk
        while b"\n" in slot.inbox:
            line, _, slot.inbox = slot.inbox.partition(b"\n")
            self._on_message(slot, line)
        if len(slot.inbox) > 64 * 1024:
            log.error("worker %d: unreadable channel; replacing it", slot.number)
            _signal(slot.pid, signal.SIGKILL)

    def _on_message(self, slot: _Slot, line: bytes) -> None:
        try:
            message = json.loads(line)
            op = message["op"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("worker %d: ignoring a malformed message %.200r: %s", slot.number, line, exc)
            return
        if op == "ready":
            slot.ready, slot.quick_exits = True, 0
            log.info("worker %d (pid %d) ready", slot.number, slot.pid)
            if not self.all_ready_once and all(s.ready for s in self.slots):
                self.all_ready_once = True
                if self.ready is not None:
                    self.ready(self.port)
            return
        url = message.get("url")
        if op not in ("add", "remove", "drain") or not isinstance(url, str):
            log.warning("worker %d: ignoring a message %.200r", slot.number, line)
            return
        if op == "add":
            self.registered[url] = None
        else:
            self.registered.pop(url, None)  # a drained URL leaves the set now, each pool once it is empty
        change = {**message, "origin": slot.number}
        for other in self.slots:
            if other.channel is not None:
                self._send(other, change)

    def _send(self, slot: _Slot, message: dict) -> None:
        try:
            slot.channel.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.error("worker %d does not read its channel (%s): replacing it", slot.number, exc)
                _signal(slot.pid, signal.SIGKILL)


def serve_worker(settings, listener: socket.socket, channel: socket.socket, slot: int) -> int:
    """A worker's life, in the forked process: monkey-patch, build the app with the registry the
    settings call for (the master's, or Redis), serve on ``listener`` until SIGTERM; the exit status.

    ``ready`` goes to the master once the worker accepts connections."""
    from gevent import monkey

    monkey.patch_all()  # first thing in this process, before anything uses a socket
    from ..app import create_app
    from .server import serve_forever, tune_process
    from .worker_registry import MasterLink, WorkerRegistry

    tune_process()
    listening = socket.socket(fileno=listener.detach())  # gevent's socket class, now that it is patched
    link = MasterLink(socket.socket(fileno=channel.detach()))
    registry = None if settings.redis_url else WorkerRegistry(link, slot)
    app = create_app(settings, registry=registry)
    if registry is None:
        link.follow(lambda line: None)  # only to notice the master going away
    serve_forever(app, listening, ready=lambda port: link.send({"op": "ready", "pid": os.getpid()}),
                  restart_on_hup=False)
    return 0


def _noop(signum, frame) -> None:
    """The master's handler: the signal number reaches the loop through the wakeup fd."""


def _signal(pid: int | None, signum: int) -> None:
    if pid:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def private_handoff_dir() -> str:
    """A new private (0700) temporary directory for the workers' handoff sockets."""
    return tempfile.mkdtemp(prefix="iwsproxy-handoff-")


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
