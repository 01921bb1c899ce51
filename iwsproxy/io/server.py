"""Serving the app with gevent's WSGIServer and the proxy's handler, with a graceful stop."""

from __future__ import annotations

import gc
import logging
import signal

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from .client import ProxyHandler

__all__ = ["make_server", "serve_forever", "tune_process"]

log = logging.getLogger(__name__)

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


def make_server(app, bind: tuple[str, int]) -> WSGIServer:
    return WSGIServer(bind, app, handler_class=ProxyHandler, log=None, error_log=logging.getLogger("iwsproxy.http"))


def serve_forever(app, bind: tuple[str, int], *, ready=None, shutdown_timeout_s: float | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, close clients with 1012 and exit, within
    ``shutdown_timeout_s`` (default: the setting). In a fleet the sessions are evacuated
    while the server still answers (/healthz: 503 "draining", new clients: 503), then it stops.

    ``ready(port)`` is called once the socket listens (the demo and tests use it).
    """
    from ..app import IWSProxy  # late: the app module imports the I/O layer

    server = make_server(app, bind)
    server.start()
    stopping = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    log.info("iwsproxy listening on %s:%d", *server.address[:2])
    manager = IWSProxy.manager(app)
    if manager.fleet is not None and not manager.settings.advertise_address:
        manager.fleet.directory.address = "%s:%d" % server.address[:2]  # the port bound (for :0)
    if ready is not None:
        ready(server.address[1])
    stopping.wait()
    timeout = manager.settings.shutdown_timeout_s if shutdown_timeout_s is None else shutdown_timeout_s
    if manager.fleet is None:
        log.info("shutting down: closing clients with 1012")
        server.close()  # stop accepting
    else:
        log.info("shutting down: evacuating %d sessions", len(manager))
    if not manager.close_all(1012, "proxy restarting", timeout=timeout):
        log.warning("some pipes did not close within %.1f s", timeout)
    server.close()
    server.stop(timeout=1)

