"""The Flask side: the ``IWSProxy`` extension, ``create_app()``, the proxy route and the admin API."""

from __future__ import annotations

import gc
import hmac
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from greenlet import greenlet
from flask import Blueprint, Flask, Request, current_app, jsonify, request

from .exceptions import BackendRejected, DuplicateClient, NoBackendAvailable
from .io.backend import ClientOffer
from .io.client import UPGRADE_KEY, install_gunicorn_handler
from .io.manager import PipeManager
from .settings import Settings

__all__ = ["IWSProxy", "create_app", "uuid4_client_id"]

log = logging.getLogger(__name__)
EXTENSION_KEY = "iwsproxy"


def uuid4_client_id(client_id: str, req: Request) -> str:
    """The default client id rule: the path segment must be a random (version 4) UUID."""
    try:
        parsed = uuid.UUID(client_id)
    except (ValueError, AttributeError):
        raise ValueError("the client id must be a UUID") from None
    if parsed.version != 4 or str(parsed) != client_id.lower():
        raise ValueError("the client id must be a version 4 UUID in canonical form")
    return str(parsed)


@dataclass
class _State:
    manager: PipeManager
    settings: Settings
    client_id: Callable[[str, Request], str]


def _state() -> _State:
    return current_app.extensions[EXTENSION_KEY]


def _text(status: int, reason: str, **headers: str):
    return reason + "\n", status, {"Content-Type": "text/plain; charset=utf-8", **headers}


# ---- the proxy route ----
proxy_bp = Blueprint("iwsproxy", __name__)


@proxy_bp.route("/<client_id>", websocket=True)
def proxy(client_id: str):
    state = _state()
    upgrade = request.environ.get(UPGRADE_KEY)
    if upgrade is None:
        stock = request.environ.get("wsgi.websocket")
        log.error("upgrade reached iwsproxy without its ProxyHandler; serve with iwsproxy.io.client.ProxyHandler")
        if stock is not None:  # the stock handler already answered 101: all we can do is close
            stock.close(1011, b"server misconfigured")
            return ""
        return _text(500, "server misconfigured: WebSocket handler missing")
    try:
        client_id = state.client_id(client_id, request)
    except ValueError as exc:
        return _text(400, str(exc))
    headers = tuple((name, request.headers[name]) for name in state.settings.forward_headers
                    if name in request.headers)
    offer = ClientOffer(client_id=client_id, query=request.query_string.decode("latin-1"),
                        subprotocols=tuple(upgrade.subprotocols), headers=headers,
                        origin=request.headers.get("Origin"), remote_addr=upgrade.remote_addr)
    try:
        state.manager.create_pipe(client_id, upgrade, offer)
    except DuplicateClient as exc:
        return _text(409, str(exc))
    except BackendRejected as exc:
        return _text(exc.status, f"backend refused the connection with HTTP {exc.status}")
    except NoBackendAvailable as exc:
        log.warning("client %s refused with 503: %s", client_id[:8], exc)
        return _text(503, "no backend available", **{"Retry-After": "1"})
    return ""


@proxy_bp.route("/<client_id>")
def proxy_plain_http(client_id: str):
    return _text(426, "this is a WebSocket endpoint: connect with a WebSocket client",
                 Upgrade="websocket", Connection="Upgrade")


# ---- health and admin ----
health_bp = Blueprint("iwsproxy_health", __name__)


@health_bp.route("/healthz")
def healthz():
    manager = _state().manager
    return jsonify(status="ok", pipes=len(manager), backends=manager.pool_size())


admin_bp = Blueprint("iwsproxy_admin", __name__)


@admin_bp.before_request
def _require_token():
    token = _state().settings.admin_token
    if not token:
        return _text(404, "admin API disabled (no admin token configured)")
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        return _text(401, "missing or wrong bearer token", **{"WWW-Authenticate": 'Bearer realm="iwsproxy"'})
    return None


def _url_from_body() -> str:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        raise ValueError('expected a JSON body like {"url": "ws://host:port/path"}')
    return body["url"]


@admin_bp.get("/backends")
def list_backends():
    manager = _state().manager
    return jsonify(backends=manager.backends(), pipes=manager.pipes())


@admin_bp.get("/status")
def status():
    """Process-level numbers for operators and leak checks."""
    manager = _state().manager
    live_greenlets = sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and obj and not obj.dead)
    return jsonify(pipes=len(manager), greenlets=live_greenlets, counters=dict(manager.counters),
                   clients_closed_by_code={str(k): v for k, v in manager.closed_by_code.items()})


@admin_bp.post("/backends")
def add_backend():
    try:
        url = _url_from_body()
        added = _state().manager.add_backend(url)
    except ValueError as exc:
        return jsonify(error=str(exc)), 400
    return jsonify(url=url, added=added), 201 if added else 200


@admin_bp.delete("/backends")
def remove_backend():
    """``{"url": ...}`` removes at once; with ``"drain": true`` pipes move off it first (202)."""
    try:
        url = _url_from_body()
    except ValueError as exc:
        return jsonify(error=str(exc)), 400
    body = request.get_json(silent=True)
    manager = _state().manager
    if body.get("drain"):
        window = body.get("window_s")
        if window is not None and (not isinstance(window, (int, float)) or window < 0):
            return jsonify(error="window_s must be a number of seconds >= 0"), 400
        moving = manager.drain_backend(url, window)
        if moving is None:
            return jsonify(error="no such backend", url=url), 404
        return jsonify(url=url, draining=True, pipes=moving), 202
    if not manager.remove_backend(url):
        return jsonify(error="no such backend", url=url), 404
    return jsonify(url=url, removed=True)


# ---- the extension ----
class IWSProxy:
    """Flask extension: ``IWSProxy(app)`` or ``ext = IWSProxy(); ext.init_app(app)``.

    Configuration comes from ``app.config`` keys prefixed ``IWSPROXY_`` (the
    same names as the environment variables), unless ``settings`` is given.
    """

    def __init__(self, app: Flask | None = None, *, settings: Settings | None = None,
                 client_id: Callable[[str, Request], str] = uuid4_client_id):
        self._settings = settings
        self._client_id = client_id
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("iwsproxy is already registered on this app")
        settings = self._settings or Settings.load(config=app.config, env=os.environ)
        manager = PipeManager(settings)
        app.extensions[EXTENSION_KEY] = _State(manager, settings, self._client_id)
        app.register_blueprint(health_bp)
        app.register_blueprint(admin_bp, url_prefix=settings.admin_prefix or None)
        app.register_blueprint(proxy_bp, url_prefix=settings.proxy_prefix or None)
        install_gunicorn_handler()

    @staticmethod
    def manager(app: Flask | None = None) -> PipeManager:
        return (app or current_app).extensions[EXTENSION_KEY].manager


def create_app(settings: Settings | None = None) -> Flask:
    """A Flask app that is only the proxy (used by ``iwsproxy serve``, wsgi.py and gunicorn)."""
    app = Flask("iwsproxy")
    IWSProxy(app, settings=settings)
    return app
