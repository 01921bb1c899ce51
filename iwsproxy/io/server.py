"""Serving the app with gevent's WSGIServer and the proxy's handler, with a graceful stop."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
from time import monotonic

import gevent
from gevent.event import Event
from gevent.pool import Group
from gevent.pywsgi import WSGIServer

from .client import ProxyHandler

__all__ = ["make_server", "serve_forever", "tune_process"]

log = logging.getLogger(__name__)

HANDSHAKES_TIMEOUT_S = 2.0  # a restart waits this long for the upgrades under way when it stops accepting
GC_YOUNG_THRESHOLD = 20_000  # allocations between collections of CPython's youngest generation (default 700)


def tune_process() -> None:
    """Process-wide tuning, for a process that is the proxy's own (``iwsproxy serve``, ``wsgi.py``),
    not for an app that embeds the extension (it shares these with the app).

    * gevent keeps no spawn-tree record per greenlet (KiBs per pipe).
    * CPython's youngest generation is collected every 20,000 allocations, not 700. The
      keepalives of thousands of quiet pipes otherwise move enough short-lived objects into the
      oldest generation to start a full collection every few seconds, and a full collection
      walks every object of every pipe: measured with 9,000 idle pipes, 0.55 s each, about
      half of the process's CPU.
    """
    gevent.config.track_greenlet_tree = False
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def make_server(app, bind, *, spawn="default") -> WSGIServer:
    """A server for ``app`` on ``bind``: an address, or a listening socket (inherited)."""
    return WSGIServer(bind, app, handler_class=ProxyHandler, log=None, error_log=logging.getLogger("iwsproxy.http"),
                      spawn=spawn)


def serve_forever(app, bind, *, ready=None, shutdown_timeout_s: float | None = None,
                  restart_on_hup: bool = True) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, close clients with 1012 and exit, within
    ``shutdown_timeout_s`` (default: the setting). In a fleet the sessions are evacuated
    while the server still answers (/healthz: 503 "draining", new clients: 503), then it stops.

    ``bind``: a ``(host, port)`` to listen on, or a listening socket.

    On SIGHUP, restart without a disconnect (:mod:`iwsproxy.io.handover`): a successor takes the
    listening socket and every pipe, and this process exits once it holds nothing; if the
    successor fails, this process serves on. A process started as a successor takes its
    listening socket and its pipes from its predecessor instead of binding ``bind``.

    With ``restart_on_hup`` false (a worker of ``serve --workers``, whose successor would not be
    its master's), SIGHUP is logged and ignored.

    ``ready(port)`` is called once the socket listens (the demo and tests use it).
    """
    from ..app import IWSProxy  # late: the app module imports the I/O layer
    from .handover import Predecessor, inherited_listener

    manager = IWSProxy.manager(app)
    listener = inherited_listener()
    predecessor = Predecessor.inherited()
    requests = Group()  # the requests being served (a restart waits for those that may open pipes)
    server = make_server(app, listener if listener is not None else bind, spawn=requests.spawn)
    server.start()
    stopping = Event()
    restarts = Group()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    if restart_on_hup:
        gevent.signal_handler(signal.SIGHUP, _restart_once, restarts, server, requests, manager, stopping)
    else:
        gevent.signal_handler(signal.SIGHUP, log.warning, "SIGHUP ignored: a worker of serve --workers does not "
                                                         "restart on its own (restart the master instead)")
    log.info("iwsproxy listening on %s:%d (pid %d)", *server.address[:2], os.getpid())
    if manager.fleet is not None and not manager.settings.advertise_address:
        manager.fleet.directory.address = "%s:%d" % server.address[:2]  # the port bound (for :0)
    if ready is not None:
        ready(server.address[1])
    if predecessor is not None:
        restarts.spawn(_take_over, predecessor, manager)
    notify_systemd(f"READY=1\nMAINPID={os.getpid()}")
    stopping.wait()
    timeout = manager.settings.shutdown_timeout_s if shutdown_timeout_s is None else shutdown_timeout_s
    if manager.counters["handovers_completed"]:
        log.info("handed over: exiting once the %d pipes left here have closed (1012 for those still open)",
                 len(manager))
        server.close()  # stop accepting
    elif manager.fleet is None:
        log.info("shutting down: closing clients with 1012")
        server.close()  # stop accepting
    else:
        log.info("shutting down: evacuating %d sessions", len(manager))  # still answering: 503s
    restarts.kill(timeout=1)
    if not manager.close_all(1012, "proxy restarting", timeout=timeout):
        log.warning("some pipes did not close within %.1f s", timeout)
    server.close()
    server.stop(timeout=1)


def _restart_once(restarts: Group, server, requests: Group, manager, stopping: Event) -> None:
    """SIGHUP: start a restart unless one is under way (runs in the hub: only spawns)."""
    if len(restarts):
        log.warning("restart: SIGHUP ignored, a handover is under way")
        return
    restarts.spawn(restart, server, requests, manager, stopping)


def _take_over(predecessor, manager) -> None:
    started = monotonic()
    taken = predecessor.serve(manager.adopt_moved, manager.adopt_pools)
    log.info("restart: took over %d pipes from process %d in %.0f ms", taken, os.getppid(),
             (monotonic() - started) * 1000)


def restart(server, requests: Group, manager, stopping: Event) -> bool:
    """Hand the listening socket and every pipe to a successor; True (and ``stopping`` set) if
    it took over, False if it failed (logged; this process serves on, nothing lost)."""
    from .handover import Successor

    started = monotonic()
    manager.counters["handovers_started"] += 1
    manager.metrics.handover("started")
    log.info("restart: starting a successor to take over %d pipes", len(manager))
    try:
        successor = Successor(server.socket)
    except OSError as exc:
        return _restart_failed(manager, f"cannot start a successor: {exc}")
    if not successor.wait_ready():
        successor.abandon()
        return _restart_failed(manager, f"successor {successor.pid} did not take over: {successor.error}")
    if not successor.send_pools(manager.pool_state()):
        successor.abandon()
        return _restart_failed(manager, f"successor {successor.pid} went away: {successor.error}")
    server.stop_accepting()  # new connections wait in the backlog for the successor
    counts = manager.move_all(successor.send_pipe)
    moving_ms = (monotonic() - started) * 1000
    requests.join(timeout=HANDSHAKES_TIMEOUT_S)  # upgrades accepted before we stopped: their pipes move too
    more = manager.move_all(successor.send_pipe)
    moved = counts.get("moved", 0) + more.get("moved", 0)
    if not successor.alive:
        server.start_accepting()
        successor.abandon()
        return _restart_failed(manager, f"successor {successor.pid} failed after taking {moved} pipes: "
                                        f"{successor.error}")
    successor.finish()
    manager.counters["handovers_completed"] += 1
    manager.metrics.handover("completed")
    log.info("restart: process %d took over in %.0f ms (%.0f ms to start it and move the first %d pipes): "
             "%d pipes moved, %d refused (closed with 1012), %d ending here", successor.pid,
             (monotonic() - started) * 1000, moving_ms, counts.get("moved", 0), moved, more.get("refused", 0),
             more.get("ending", 0))
    stopping.set()
    return True


def _restart_failed(manager, why: str) -> bool:
    log.error("restart failed, serving on: %s", why)
    manager.counters["handovers_failed"] += 1
    manager.metrics.handover("failed")
    return False


def notify_systemd(state: str) -> None:
    """Tell systemd (``Type=notify``, ``NotifyAccess=all``) our state, if it started us."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), path)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path, exc)
