"""The Flask side: the ``IWSProxy`` extension, ``create_app()``, the proxy route and the admin API."""

from __future__ import annotations

import gc
import hmac
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus

from greenlet import greenlet
from flask import Blueprint, Flask, Request, current_app, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from .clientid import cookie_name, find_client_id, id_cookie, new_client_id
from .exceptions import BackendRejected, CapacityExceeded, DuplicateClient, NoBackendAvailable, ResumeRefused
from .frames import encode_close_payload
from .io.backend import CLIENT_ID_HEADER, ClientOffer, check_backend_url, url_allowed
from .io.client import UPGRADE_KEY
from .io.manager import PipeManager
from .metrics import PrometheusMetrics
from .policy import FailureLimiter, origin_allowed
from .routes import DEFAULT_POOL, has_dot_segment
from .settings import Settings, check_drain_window
from .status import ASSETS_ENDPOINT, presented_token, status_bp

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
    admin_failures: FailureLimiter


def _state() -> _State:
    return current_app.extensions[EXTENSION_KEY]


def _text(status: int, reason: str, **headers: str):
    return reason + "\n", status, {"Content-Type": "text/plain; charset=utf-8", **headers}


def _as_sent(value: str, name: str) -> str:
    """A header value to forward, as the string that reaches the backend as the client's own bytes.

    WSGI gives header values decoded as latin-1 (one character per byte), and websocket-client
    encodes the whole backend request as UTF-8: passed on as they are, the bytes of "é" (c3 a9)
    would arrive as c3 83 c2 a9. Decoding the client's bytes as UTF-8 makes that encoding give
    them back unchanged. Bytes that are not UTF-8 cannot pass through it unchanged: ValueError (400).
    """
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise ValueError(f"the {name} header is not UTF-8 and cannot be forwarded unchanged") from None


def _forwarded(name: str, value: str) -> str | None:
    """A forwarded header's value as sent (see :func:`_as_sent`); None if nothing of it can go.

    A cookie that is not UTF-8 (a legacy app on the same domain may set raw latin-1 bytes, and
    the browser sends them on every request) is left out, and the other cookies go on: one
    unrelated cookie must not keep a user from connecting. Any other such header is a 400.
    """
    if name.lower() != "cookie":
        return _as_sent(value, name)
    kept = []
    for pair in value.split(";"):
        try:
            kept.append(_as_sent(pair, name))
        except ValueError:
            log.info("a cookie that is not UTF-8 is not forwarded: %.40r", pair.partition("=")[0].strip())
    return ";".join(kept).strip() or None


def _without_token(query: str) -> str:
    """The query without its ``token`` parameters; every other byte as the client sent it."""
    return "&".join(part for part in query.split("&") if unquote_plus(part.partition("=")[0]) != "token")


# ---- the proxy route ----
proxy_bp = Blueprint("iwsproxy", __name__)


def _raw_path() -> str:
    """The request's path as the client sent it (percent escapes kept), as forwarded to backends.

    From ``RAW_URI`` (set by :class:`~iwsproxy.io.client.ProxyHandler` and gunicorn), else
    rebuilt from the decoded ``SCRIPT_NAME`` + ``PATH_INFO``. ValueError (400) if its bytes are not
    UTF-8 (see :func:`_as_sent`).
    """
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    path = raw.partition("?")[0]
    if not path.startswith("/"):  # absent, or an absolute-form target: rebuild it
        path = quote((environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1"),
                     safe="/:@!$&'()*+,;=~")
    return _as_sent(path, "request path")


def _client_id(state: _State, path: str) -> tuple[str, bool]:
    """The request's client id, from the configured sources (see :mod:`iwsproxy.clientid`) and
    checked by the extension's ``client_id`` rule, and whether it was assigned just now (none in
    the request, ``assign_client_id`` on). ValueError (400) for a missing, ambiguous or invalid id."""
    sources = state.settings.client_id_from
    headers = {name.lower(): request.headers.getlist(name)
               for kind, _, name in (source.partition(":") for source in sources) if kind == "header"}
    found = find_client_id(sources, path=path, query=request.args.to_dict(flat=False), headers=headers,
                           cookie_header=request.headers.get("Cookie", ""))
    if found is not None:
        return state.client_id(found, request), False
    if state.settings.assign_client_id:
        return new_client_id(), True
    raise ValueError("no client id in the request (looked in " + ", ".join(sources) + ")")


def _without_last_segment(path: str) -> str:
    """``/chat/<id>`` -> ``/chat``, ``/<id>`` -> ``/``: the path a backend gets when the id is in it."""
    return path.rstrip("/").rpartition("/")[0] or "/"


@proxy_bp.route("/", websocket=True, defaults={"path": ""})
@proxy_bp.route("/<path:path>", websocket=True)
def proxy(path: str):
    state = _state()
    upgrade = request.environ.get(UPGRADE_KEY)
    if upgrade is None:
        stock = request.environ.get("wsgi.websocket")
        log.error("upgrade reached iwsproxy without its ProxyHandler; serve with iwsproxy.io.client.ProxyHandler")
        if stock is not None:  # the stock handler already answered 101: all we can do is close
            # (WebSocket.close() would put only the reason on the wire: build the payload ourselves)
            stock.send_frame(encode_close_payload(1011, "server misconfigured"), stock.OPCODE_CLOSE)
            stock.closed = True
            return ""
        return _text(500, "server misconfigured: WebSocket handler missing")
    settings = state.settings
    if not origin_allowed(request.headers.get("Origin"), request.host, settings.allowed_origins,
                          allow_missing=settings.allow_no_origin):
        log.warning("refused an upgrade from origin %r", request.headers.get("Origin"))
        return _text(403, "origin not allowed")
    if settings.routes and has_dot_segment(request.path):
        return _text(400, "a path with a . or .. segment names no single route")
    pool = state.manager.pool_for_path(request.path)
    if pool is None:
        return _text(404, "no route for this path")
    try:
        client_id, assigned = _client_id(state, path)
        backend_path = _raw_path()
        if "path" in settings.client_id_from:
            backend_path = _without_last_segment(backend_path)
        forwarded = ((name, _forwarded(name, request.headers[name])) for name in state.settings.forward_headers
                     if name in request.headers)
        headers = tuple((name, value) for name, value in forwarded if value is not None)
        origin = _as_sent(request.headers["Origin"], "Origin") if "Origin" in request.headers else None
    except ValueError as exc:
        return _text(400, str(exc))
    token = request.args.get("token") or request.headers.get("X-Iwsproxy-Token")
    query = request.query_string.decode("utf-8")  # (checked by _query_must_be_utf8)
    if state.settings.resume_secret and "token" in request.args:  # the resume token is not the backend's business
        query = _without_token(query)
    if assigned:  # on the 101 only: a refusal carries no id, and each request gets its own
        cookie = id_cookie(cookie_name(settings.client_id_from), client_id, secure=request.scheme == "https",
                           path=settings.proxy_prefix or "/")
        upgrade.response_headers[:] = [("Set-Cookie", cookie), (CLIENT_ID_HEADER, client_id)]
    offer = ClientOffer(client_id=client_id, query=query,
                        subprotocols=tuple(upgrade.subprotocols), headers=headers,
                        origin=origin, remote_addr=request.remote_addr or "", path=backend_path)
    try:
        state.manager.create_pipe(client_id, upgrade, offer, token=token, pool=pool)
    except DuplicateClient as exc:
        return _text(409, str(exc))
    except ResumeRefused as exc:
        return _text(403, str(exc))
    except CapacityExceeded as exc:
        return _text(exc.status, str(exc), **{"Retry-After": "5"})
    except BackendRejected as exc:
        return _text(exc.status, f"backend refused the connection with HTTP {exc.status}")
    except NoBackendAvailable as exc:
        log.warning("client %s refused with 503: %s", client_id[:8], exc)
        return _text(503, "no backend available", **{"Retry-After": "1"})
    return ""


@proxy_bp.route("/<path:path>")  # (no plain "/" rule: an embedding app's index page keeps it)
def proxy_plain_http(path: str):
    return _text(426, "this is a WebSocket endpoint: connect with a WebSocket client",
                 Upgrade="websocket", Connection="Upgrade")


# ---- health and admin ----
health_bp = Blueprint("iwsproxy_health", __name__)


@health_bp.route("/healthz")
def healthz():
    manager = _state().manager
    if manager.draining:  # balancers stop sending clients here
        return jsonify(status="draining", pid=os.getpid(), pipes=len(manager),
                       backends=manager.backend_count()), 503
    return jsonify(status="ok", pid=os.getpid(), pipes=len(manager), backends=manager.backend_count())


@health_bp.route("/metrics")
def metrics():
    """Prometheus text format; not behind the admin token, like /healthz."""
    body, content_type = _state().manager.metrics.render()
    return body, 200, {"Content-Type": content_type}


admin_bp = Blueprint("iwsproxy_admin", __name__)


@proxy_bp.before_request
@admin_bp.before_request
@status_bp.before_request
def _query_must_be_utf8():
    """400 for a query string that is not UTF-8, before anything reads ``request.args``: Werkzeug
    decodes it as strict UTF-8 on first use and raises (a 500); the proxy route forwards it as is."""
    try:
        request.query_string.decode("utf-8")
    except UnicodeDecodeError:
        return _text(400, "the query string is not UTF-8")
    return None


@admin_bp.before_request
@status_bp.before_request
def _require_token():
    """The admin API and the status page need the token (the page also takes ``?token=``)."""
    state = _state()
    token = state.settings.admin_token
    if not token:
        return _text(404, "admin API disabled (no admin token configured)")
    if request.endpoint == ASSETS_ENDPOINT:
        return None  # the status page's script: the same file for everyone, no data in it
    address, now = request.remote_addr or "", time.monotonic()
    wait_s = state.admin_failures.blocked(address, now)
    if wait_s:
        return _text(429, "too many failed admin logins; try again later", **{"Retry-After": str(int(wait_s) + 1)})
    scheme, value = presented_token()
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        state.admin_failures.failed(address, now)
        log.warning("admin request with a missing or wrong token from %s", address)
        return _text(401, "missing or wrong bearer token", **{"WWW-Authenticate": 'Bearer realm="iwsproxy"'})
    return None


def _url_from_body() -> str:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        raise ValueError('expected a JSON body like {"url": "ws://host:port/path"}')
    return body["url"]


def _pool_from_body() -> str:
    """The body's ``pool`` (a route's prefix; "default" if absent); ValueError if not a string."""
    pool = request.get_json(silent=True).get("pool", DEFAULT_POOL)
    if not isinstance(pool, str):
        raise ValueError('"pool" must be a pool name, such as "default" or a route prefix')
    return pool


def _no_such_pool(pool: str):
    pools = _state().manager.pool_names()
    error = "no such pool"
    if pool == DEFAULT_POOL:
        error += " (routes are set without a catch-all: start with --backend URL or --route /=URL to have one)"
    return jsonify(error=error, pool=pool, pools=pools), 404


@admin_bp.get("/backends")
def list_backends():
    """Every backend (each naming its ``pool``), the pipes, and the pool names."""
    manager = _state().manager
    return jsonify(backends=manager.backends(), pipes=manager.pipes(), pools=manager.pool_names())


@admin_bp.get("/status")
def status():
    """Process-level numbers for operators and leak checks."""
    manager = _state().manager
    objects = gc.get_objects()
    live_greenlets = sum(1 for obj in objects if isinstance(obj, greenlet) and obj and not obj.dead)
    # Python's live memory: the allocator's blocks in use and the objects the collector tracks
    memory = {"allocated_blocks": sys.getallocatedblocks(), "gc_objects": len(objects)}
    del objects
    return jsonify(pipes=len(manager), greenlets=live_greenlets, memory=memory, counters=dict(manager.counters),
                   buffered_bytes=manager.budget.used_bytes,
                   clients_closed_by_code={str(k): v for k, v in manager.closed_by_code.items()},
                   gc={"threshold": gc.get_threshold(),
                       "collections": [generation["collections"] for generation in gc.get_stats()]})


@admin_bp.post("/backends")
def add_backend():
    state = _state()
    try:
        url = _url_from_body()
        pool = _pool_from_body()
        check_backend_url(url)
        if not url_allowed(url, state.settings.backend_allowlist):
            return jsonify(error="backend host not in the allowlist (IWSPROXY_BACKEND_ALLOWLIST)", url=url), 403
        added = state.manager.add_backend(url, pool)
    except ValueError as exc:
        return jsonify(error=str(exc)), 400
    except KeyError:
        return _no_such_pool(pool)
    return jsonify(url=url, pool=pool, added=added), 201 if added else 200


@admin_bp.delete("/backends")
def remove_backend():
    """``{"url": ...}`` removes at once; with ``"drain": true`` pipes move off it first (202).
    ``"pool"`` names the pool ("default" if absent)."""
    try:
        url = _url_from_body()
        pool = _pool_from_body()
    except ValueError as exc:
        return jsonify(error=str(exc)), 400
    body = request.get_json(silent=True)
    manager = _state().manager
    if pool not in manager.leases:
        return _no_such_pool(pool)
    if body.get("drain"):
        window = body.get("window_s")
        try:
            window = None if window is None else check_drain_window(window)
        except ValueError as exc:
            return jsonify(error=f"window_s {exc}"), 400
        moving = manager.drain_backend(url, window, pool)
        if moving is None:
            return jsonify(error="no such backend", url=url, pool=pool), 404
        return jsonify(url=url, pool=pool, draining=True, pipes=moving), 202
    if not manager.remove_backend(url, pool):
        return jsonify(error="no such backend", url=url, pool=pool), 404
    return jsonify(url=url, pool=pool, removed=True)


# ---- the extension ----
class IWSProxy:
    """Flask extension: ``IWSProxy(app)`` or ``ext = IWSProxy(); ext.init_app(app)``.

    Configuration comes from ``app.config`` keys prefixed ``IWSPROXY_`` (the
    same names as the environment variables), unless ``settings`` is given.
    ``registry`` (a :class:`~iwsproxy.io.registry.Registry`) overrides the one
    the settings choose (Redis with ``redis_url``, else this process's own).
    """

    def __init__(self, app: Flask | None = None, *, settings: Settings | None = None,
                 client_id: Callable[[str, Request], str] = uuid4_client_id, registry=None):
        self._settings = settings
        self._client_id = client_id
        self._registry = registry
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("iwsproxy is already registered on this app")
        settings = self._settings or Settings.load(config=app.config, env=os.environ)
        registry, pool_registry = self._registry, None
        if registry is None and settings.redis_url:
            from .io.redis_pools import redis_registries  # here: redis is imported only when used

            registry, pool_registry = redis_registries(settings.redis_url)
        directory = None
        if settings.redis_url and settings.resume_grace_s:
            from .io.fleet import SessionDirectory

            directory = SessionDirectory(settings.redis_url, address=settings.advertise_address or settings.bind)
        metrics = PrometheusMetrics()
        manager = PipeManager(settings, registry=registry, pool_registry=pool_registry, metrics=metrics,
                              directory=directory)
        metrics.call_later = manager.call_later  # its publisher is the manager's, stopped at shutdown
        app.extensions[EXTENSION_KEY] = _State(manager, settings, self._client_id,
                                               FailureLimiter(settings.admin_max_failures, window_s=60.0))
        app.register_blueprint(health_bp)
        app.register_blueprint(admin_bp, url_prefix=settings.admin_prefix or None)
        app.register_blueprint(status_bp, url_prefix=settings.admin_prefix or None)
        app.register_blueprint(proxy_bp, url_prefix=settings.proxy_prefix or None)
        from .gunicorn import support_stock_worker  # here: it imports gunicorn

        support_stock_worker(manager)

    @staticmethod
    def manager(app: Flask | None = None) -> PipeManager:
        return (app or current_app).extensions[EXTENSION_KEY].manager


def create_app(settings: Settings | None = None, *, registry=None) -> Flask:
    """A Flask app that is only the proxy (used by ``iwsproxy serve``, wsgi.py and gunicorn).

    With ``trusted_proxy_hops`` the client address is taken from X-Forwarded-For,
    and the scheme (https makes an assigned id's cookie Secure) from
    X-Forwarded-Proto, by Werkzeug's ``ProxyFix`` (an app embedding the extension
    applies ``ProxyFix`` itself, as it does for its own routes). ``registry``: see :class:`IWSProxy`.
    """
    app = Flask("iwsproxy", static_folder=None)  # the status page serves its own script
    IWSProxy(app, settings=settings, registry=registry)
    hops = app.extensions[EXTENSION_KEY].settings.trusted_proxy_hops
    if hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    return app
