"""The proxy under gunicorn.

    gunicorn -k iwsproxy.gunicorn.Worker wsgi:app                                  (recommended)
    gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker wsgi:app    (still works)

:class:`Worker` is geventwebsocket's worker serving with the proxy's
:class:`~iwsproxy.io.client.ProxyHandler` (refusals are HTTP statuses, sent
before any upgrade) and stopping gracefully: on SIGTERM it stops accepting and
closes every client with 1012 (Service Restart), and exits once the pipes are
gone instead of waiting out gunicorn's ``graceful_timeout``. With a handoff directory
(``IWSPROXY_HANDOFF_DIR``) it first hands its pipes to a live worker (gunicorn's HUP starts the
new workers before it stops the old ones), connections and sessions as they are; only what
cannot move is closed with 1012.

The stock worker knows nothing of the proxy, so the app gives it the same two
things when it is loaded in the worker: :func:`support_stock_worker`, called by
``IWSProxy.init_app``, is all that path needs.
"""

from __future__ import annotations

import logging
import signal

from geventwebsocket.gunicorn.workers import GeventWebSocketWorker

from .io.client import ProxyHandler

__all__ = ["Worker", "support_stock_worker"]

log = logging.getLogger(__name__)

SHUTDOWN_CODE = 1012
SHUTDOWN_REASON = "proxy restarting"


class Worker(GeventWebSocketWorker):
    """gunicorn's gevent worker with :class:`ProxyHandler` and the proxy's graceful stop.

    The app gunicorn loads is a Flask app carrying the ``IWSProxy`` extension
    (``wsgi:app``, or an app of your own with ``IWSProxy(app)``; wrap
    ``app.wsgi_app``, not the app, in middleware). Any other app is served,
    with a warning that SIGTERM will wait out ``graceful_timeout``.
    """

    wsgi_handler = ProxyHandler
    manager = None  # the loaded app's PipeManager, None until loaded or if it has none

    def load_wsgi(self) -> None:
        super().load_wsgi()
        from .app import IWSProxy  # here: in the worker, once gunicorn has monkey-patched

        try:
            self.manager = IWSProxy.manager(self.wsgi)
            self.manager.listen_for_peers()  # a stopping worker may hand us its pipes
        except (AttributeError, KeyError):
            log.warning("the app %r has no IWSProxy extension: on SIGTERM its connections are kept until "
                        "gunicorn's graceful timeout", self.wsgi)

    @property
    def alive(self) -> bool:
        return self._alive

    @alive.setter
    def alive(self, value: bool) -> None:
        """gunicorn ends a worker by setting this False: on SIGTERM (``handle_exit``) and when it
        is recycled (``--max-requests``); either way the pipes move or close (:meth:`_stopping`)."""
        self._alive = value
        if not value:
            self._stopping()

    def _stopping(self) -> None:
        """gunicorn stops accepting and waits for its pools; the pipes move to a live worker
        (with a handoff directory), and those left close with 1012."""
        if self.manager is not None:
            self.manager.begin_shutdown(SHUTDOWN_CODE, SHUTDOWN_REASON, hand_over=True)


def support_stock_worker(manager) -> bool:
    """In geventwebsocket's stock worker, serve with :class:`ProxyHandler` and stop as :class:`Worker` does.

    Called with the app's ``manager`` while the app is loaded. gunicorn's worker
    installs its signal handlers, then loads the app, then reads
    ``wsgi_handler`` to serve; so the worker that loads the app is the owner of
    the SIGTERM handler, gets the handler set on it, and gets the pipes' 1012
    close chained after its own SIGTERM handling. Several apps in one worker
    chain onto each other. Returns False, changing nothing, outside a gunicorn
    worker (the app loaded by ``--preload``, ``iwsproxy serve``, a test) and
    under :class:`Worker`, which does both itself.
    """
    previous = signal.getsignal(signal.SIGTERM)
    worker = getattr(previous, "iwsproxy_worker", None) or getattr(previous, "__self__", None)
    if not isinstance(worker, GeventWebSocketWorker) or isinstance(worker, Worker):
        return False
    worker.wsgi_handler = ProxyHandler

    def on_sigterm(signum, frame):
        previous(signum, frame)
        manager.begin_shutdown(SHUTDOWN_CODE, SHUTDOWN_REASON)

    on_sigterm.iwsproxy_worker = worker
    signal.signal(signal.SIGTERM, on_sigterm)
    return True
