"""Settings: one frozen object, each field declared once.  [pure]

Every field carries its default, its parser, its environment variable (which is
also its Flask config key) and its help text. Values are resolved in layers:
defaults < Flask config < environment < command-line flags. An invalid value
raises :class:`~iwsproxy.exceptions.ConfigError` naming the key, the value and
where it came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .clientid import parse_source
from .exceptions import ConfigError
from .frames import BYTES_PER_EXTRA_FRAGMENT
from .routes import Route, is_catch_all, parse_routes, prefix_matches

__all__ = ["Settings", "cpu_count", "parse_size", "describe", "check_drain_window", "MAX_DRAIN_WINDOW_S"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
               "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3}


def parse_size(value: Any) -> int:
    """``"64KiB"`` -> 65536, ``"5MiB"`` -> 5242880, ``"10kB"`` -> 10000, ``123`` -> 123."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        unit = (match.group(2) or "").lower() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError("expected a size such as 65536, 64KiB or 5MiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError("must not be negative")
    return size


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    # empty is no answer (an unset ${VAR} in a compose file): never a silent False, as for TLS checks
    raise ValueError("expected true/false")


def _parse_seconds(value: Any) -> float:
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a finite number of seconds >= 0")
    return seconds


MAX_DRAIN_WINDOW_S = 86400.0  # a day; a drain marker in Redis lives this long plus a grace


def check_drain_window(seconds: Any) -> float:
    """A drain window given as a number (not a bool) of seconds from 0 to a day; ValueError otherwise.

    A longer window is a mistake rather than a plan, and an unbounded one cannot be
    written to Redis (the drain marker's expiry must fit its range).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_DRAIN_WINDOW_S:
        raise ValueError(f"must be a number of seconds from 0 to {MAX_DRAIN_WINDOW_S:g}")
    return float(seconds)


def _parse_drain_window(value: Any) -> float:
    return check_drain_window(_parse_seconds(value))


def _parse_positive_seconds(value: Any) -> float:
    seconds = _parse_seconds(value)
    if not seconds:
        raise ValueError("must be a number of seconds > 0")
    return seconds


def _parse_positive_int(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def _parse_positive_size(value: Any) -> int:
    size = parse_size(value)
    if not size:
        raise ValueError("must be a size > 0")
    return size


def _parse_count(value: Any) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity masks on this platform
        return os.cpu_count() or 1


def _parse_workers(value: Any) -> int:
    """A count of worker processes >= 1, or ``auto``: one per CPU this process may use."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return cpu_count()
    if isinstance(value, bool):
        raise ValueError("expected a number of processes or auto")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number of processes >= 1 or auto") from None
    if number < 1:
        raise ValueError("expected a number of processes >= 1 or auto")
    return number


def _parse_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = value.split(",")
    else:
        items = list(value)
    return tuple(item.strip() for item in items if item and item.strip())


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower().replace("_", "-")
        for choice in choices:
            if text == choice.replace("_", "-"):
                return choice
        raise ValueError("expected one of " + ", ".join(choices))
    return parse


def _parse_prefix(value: Any) -> str:
    text = str(value).strip()
    if text and not text.startswith("/"):
        raise ValueError("a URL prefix starts with /")
    return text.rstrip("/")


def _parse_id_sources(value: Any) -> tuple[str, ...]:
    sources = tuple(parse_source(item) for item in _parse_list(value))
    if not sources:
        raise ValueError("expected at least one of path, query:NAME, header:NAME, cookie:NAME")
    return sources


def _parse_optional_str(value: Any) -> str | None:
    text = str(value) if value is not None else ""
    return text or None


def setting(default: Any, env: str, parse: Callable[[Any], Any], help: str, flag: str | None = None):
    """Declare one setting: default, environment name (= Flask config key), parser, help, CLI flag."""
    return field(default=default, metadata={"env": env, "parse": parse, "help": help, "flag": flag})


@dataclass(frozen=True)
class Settings:
    # --- service ---
    bind: str = setting("127.0.0.1:8080", "IWSPROXY_BIND", str, "HOST:PORT the server listens on", "--bind")
    backends: tuple[str, ...] = setting((), "IWSPROXY_BACKENDS", _parse_list,
                                        "backend WebSocket URLs registered at start (the flag is repeatable, the variable "
                                        "comma separated; with Redis they only seed a new registry)", "--backend")
    routes: tuple[Route, ...] = setting((), "IWSPROXY_ROUTES", parse_routes,
                                        "a pool of its own for paths under PREFIX: PREFIX=URL[,URL...] (the flag is "
                                        "repeatable, the variable separates routes with ;); the longest prefix wins, "
                                        "by whole path segments; the pool is named PREFIX. A path under no route goes "
                                        "to the default pool (the --backend URLs; --route /=URL is another way to give "
                                        "them), or gets 404 if there is none. With --workers N, needs --redis-url",
                                        "--route")
    workers: int = setting(1, "IWSPROXY_WORKERS", _parse_workers,
                           "iwsproxy serve only: worker processes sharing the listening port (auto: one per CPU); "
                           "with more than one, a master process restarts any that exits, passes SIGTERM and "
                           "SIGHUP on to all, shares admin backend changes between them (or --redis-url does) "
                           "and creates a private --handoff-dir if none is set, so that a client resuming on "
                           "any worker gets its session back. Under gunicorn use -w instead", "--workers")
    admin_token: str | None = setting(None, "IWSPROXY_ADMIN_TOKEN", _parse_optional_str,
                                      "bearer token for the admin routes; unset turns them off", "--admin-token")
    proxy_prefix: str = setting("", "IWSPROXY_PROXY_PREFIX", _parse_prefix,
                                "URL prefix of the proxy route (clients connect to PREFIX/<client-id>)")
    client_id_from: tuple[str, ...] = setting(("path",), "IWSPROXY_CLIENT_ID_FROM", _parse_id_sources,
                                              "where the client id is read: path (the path's last segment), "
                                              "query:NAME, header:NAME or cookie:NAME (the flag is repeatable, "
                                              "the variable comma separated; ids that disagree: 400)",
                                              "--client-id-from")
    assign_client_id: bool = setting(False, "IWSPROXY_ASSIGN_CLIENT_ID", _parse_bool,
                                     "give a request without a client id a new random one, returned in the 101 "
                                     "as a cookie (named by the first cookie:NAME source, else iwsproxy_id) and "
                                     "in X-Iwsproxy-Client-Id (otherwise such a request gets 400)",
                                     "--assign-client-id")
    admin_prefix: str = setting("/admin", "IWSPROXY_ADMIN_PREFIX", _parse_prefix, "URL prefix of the admin routes")
    # --- sessions ---
    buffer_limit_bytes: int = setting(5 * 1024 * 1024, "IWSPROXY_BUFFER_LIMIT", parse_size,
                                      "per-client cap on the backlog held for each peer (buffered + unacknowledged; "
                                      "past it: close 1013); a buffer under half full takes any message, so every "
                                      "message up to --max-message-size reaches a live peer, whatever this is",
                                      "--buffer-limit")
    delivery: str = setting("at-least-once", "IWSPROXY_DELIVERY", _choice("at-least-once", "at-most-once"),
                            "at-least-once replays what a lost backend may not have read; at-most-once does not",
                            "--delivery")
    reconnect_deadline_s: float = setting(0.0, "IWSPROXY_RECONNECT_DEADLINE", _parse_seconds,
                                          "close a client with 1013 if no backend is found within this many "
                                          "seconds of losing one (0 = wait as long as the buffer allows)",
                                          "--reconnect-deadline")
    wait_for_backend: bool = setting(False, "IWSPROXY_WAIT_FOR_BACKEND", _parse_bool,
                                     "accept a client with no backend free and buffer until one is "
                                     "(otherwise answer 503)", "--wait-for-backend")
    max_message_size_bytes: int = setting(16 * 1024 * 1024, "IWSPROXY_MAX_MESSAGE_SIZE", parse_size,
                                          "largest message accepted from either side (larger: close 1009)",
                                          "--max-message-size")
    pong_timeout_s: float = setting(10.0, "IWSPROXY_PONG_TIMEOUT", _parse_seconds,
                                    "a backend that does not answer a ping within this time is treated as failed, "
                                    "and a peer that takes none of our writes for this long is dropped "
                                    "(0 = no limit)",
                                    "--pong-timeout")
    keepalive_s: float = setting(20.0, "IWSPROXY_KEEPALIVE", _parse_seconds,
                                 "ping an idle backend this often, so a dead one is noticed (0 = never)",
                                 "--keepalive")
    drain_window_s: float = setting(5.0, "IWSPROXY_DRAIN_WINDOW", _parse_drain_window,
                                    "a drained backend's pipes move over this many seconds (no stampede)",
                                    "--drain-window")
    redis_url: str | None = setting(None, "IWSPROXY_REDIS_URL", _parse_optional_str,
                                    "share the backend registry through this Redis (redis://host:port/db); "
                                    "unset: each process has its own", "--redis-url")
    resume_grace_s: float = setting(30.0, "IWSPROXY_RESUME_GRACE", _parse_seconds,
                                    "a client gone without a normal close may come back with its id within this "
                                    "many seconds and get its session back (0 turns resume off)", "--resume-grace")
    on_duplicate: str = setting("takeover", "IWSPROXY_ON_DUPLICATE", _choice("takeover", "refuse"),
                                "a connection with the id of a live, attached session takes it over "
                                "(the old one is closed with 4409) or is refused with 409", "--on-duplicate")
    handoff_dir: str | None = setting(None, "IWSPROXY_HANDOFF_DIR", _parse_optional_str,
                                      "a private directory shared by the proxy processes of one host (e.g. "
                                      "gunicorn's workers): a client that reconnects to another process is "
                                      "handed to the one holding its session; unset: each process on its own",
                                      "--handoff-dir")
    advertise_address: str | None = setting(None, "IWSPROXY_ADVERTISE_ADDRESS", _parse_optional_str,
                                            "HOST:PORT at which the other processes of a fleet reach this one, "
                                            "recorded with the sessions it holds in Redis (unset: --bind)",
                                            "--advertise-address")
    evacuate_max_bytes: int = setting(256 * 1024 * 1024, "IWSPROXY_EVACUATE_MAX_BYTES", parse_size,
                                      "with --redis-url, a shutdown saves the sessions to Redis for a resume on "
                                      "any process, writing at most this many bytes (the sessions past it, or "
                                      "all while Redis fails, close with 1012 and are lost); 0: no evacuation",
                                      "--evacuate-max-bytes")
    shutdown_timeout_s: float = setting(5.0, "IWSPROXY_SHUTDOWN_TIMEOUT", _parse_positive_seconds,
                                        "longest time a shutdown takes to close (or evacuate) every session",
                                        "--shutdown-timeout")
    resume_secret: str | None = setting(None, "IWSPROXY_RESUME_SECRET", _parse_optional_str,
                                        "if set, a resume or takeover must present token=HMAC-SHA256(secret, id) "
                                        "(query parameter or X-Iwsproxy-Token header)", "--resume-secret")
    # --- limits (hardening) ---
    max_fragments: int = setting(1024, "IWSPROXY_MAX_FRAGMENTS", _parse_positive_int,
                                 "frames a fragmented message may have whatever its size, plus one per "
                                 f"{BYTES_PER_EXTRA_FRAGMENT} bytes of its payload (more: close 1008): fragments "
                                 f"of {BYTES_PER_EXTRA_FRAGMENT} bytes or more on average always pass",
                                 "--max-fragments")
    max_pipes: int = setting(10000, "IWSPROXY_MAX_PIPES", _parse_positive_int,
                             "most concurrent pipes in this process (more: HTTP 503 before the upgrade)",
                             "--max-pipes")
    max_pipes_per_ip: int = setting(0, "IWSPROXY_MAX_PIPES_PER_IP", _parse_count,
                                    "most concurrent pipes per client IP (more: HTTP 429); 0 = no limit. "
                                    "Behind a load balancer every client has the balancer's address unless "
                                    "--trusted-proxy-hops is set", "--max-pipes-per-ip")
    trusted_proxy_hops: int = setting(0, "IWSPROXY_TRUSTED_PROXY_HOPS", _parse_count,
                                      "load balancers in front that append the client's address to "
                                      "X-Forwarded-For: the address that many entries from the end is the "
                                      "client's (per-IP limit, admin throttling, X-Forwarded-For to backends); "
                                      "0 = the peer address is the client's", "--trusted-proxy-hops")
    handshake_timeout_s: float = setting(10.0, "IWSPROXY_HANDSHAKE_TIMEOUT", _parse_seconds,
                                         "time allowed for a request line and headers (slower: dropped; "
                                         "0 = no limit)",
                                         "--handshake-timeout")
    max_header_size_bytes: int = setting(32 * 1024, "IWSPROXY_MAX_HEADER_SIZE", _parse_positive_size,
                                         "most bytes of header lines in a request (more: HTTP 431)",
                                         "--max-header-size")
    idle_timeout_s: float = setting(0.0, "IWSPROXY_IDLE_TIMEOUT", _parse_seconds,
                                    "close a pipe with 1001 after this many seconds without a data message "
                                    "either way (0 = never: long idle sessions are what WebSockets are for)",
                                    "--idle-timeout")
    park_after_s: float = setting(1.0, "IWSPROXY_PARK_AFTER", _parse_seconds,
                                  "a connection without traffic for this many seconds gives up its reader "
                                  "greenlet (about 8 KiB) until data arrives; 0 = never", "--park-after")
    global_buffer_limit_bytes: int = setting(1024 * 1024 * 1024, "IWSPROXY_GLOBAL_BUFFER_LIMIT", parse_size,
                                             "cap on bytes held for all pipes of this process together "
                                             "(new buffering past it: close 1013)", "--global-buffer-limit")
    allowed_origins: tuple[str, ...] = setting((), "IWSPROXY_ALLOWED_ORIGINS", _parse_list,
                                               "browser origins allowed to connect, e.g. https://app.example.com "
                                               "or https://*.example.com (none: same origin as the Host only; "
                                               "* : any)", "--allowed-origin")
    allow_no_origin: bool = setting(True, "IWSPROXY_ALLOW_NO_ORIGIN", _parse_bool,
                                    "accept requests without an Origin header (non-browser clients)",
                                    "--allow-no-origin")
    backend_allowlist: tuple[str, ...] = setting((), "IWSPROXY_BACKEND_ALLOWLIST", _parse_list,
                                                 "hosts, host:port or CIDR networks that admin-registered backend "
                                                 "URLs must match (none: any)", "--backend-allowlist")
    admin_max_failures: int = setting(10, "IWSPROXY_ADMIN_MAX_FAILURES", _parse_positive_int,
                                      "failed admin logins per client IP per minute before it gets 429")
    backend_tls_verify: bool = setting(True, "IWSPROXY_BACKEND_TLS_VERIFY", _parse_bool,
                                       "verify wss:// backend certificates")
    backend_ca_bundle: str | None = setting(None, "IWSPROXY_BACKEND_CA_BUNDLE", _parse_optional_str,
                                            "CA bundle file for wss:// backends (default: the system's)",
                                            "--backend-ca-bundle")
    # --- backends ---
    pool_policy: str = setting("round_robin", "IWSPROXY_POOL_POLICY",
                               _choice("round_robin", "least_connections", "exclusive"),
                               "how a pipe picks its backend", "--pool-policy")
    max_failures: int = setting(3, "IWSPROXY_MAX_FAILURES", _parse_positive_int,
                                "consecutive failures after which a backend is ejected", "--max-failures")
    eject_base_s: float = setting(1.0, "IWSPROXY_EJECT_BASE", _parse_seconds,
                                  "first ejection time; doubles with each ejection", "--eject-base")
    eject_max_s: float = setting(60.0, "IWSPROXY_EJECT_MAX", _parse_seconds, "longest ejection time", "--eject-max")
    connect_timeout_s: float = setting(5.0, "IWSPROXY_CONNECT_TIMEOUT", _parse_positive_seconds,
                                       "TCP + TLS + WebSocket handshake timeout for one backend", "--connect-timeout")
    backoff_initial_s: float = setting(0.05, "IWSPROXY_BACKOFF_INITIAL", _parse_positive_seconds,
                                       "first wait between rounds of reconnect attempts")
    backoff_max_s: float = setting(5.0, "IWSPROXY_BACKOFF_MAX", _parse_seconds,
                                   "longest wait between rounds of reconnect attempts")
    forward_headers: tuple[str, ...] = setting(("Cookie", "Authorization"), "IWSPROXY_FORWARD_HEADERS",
                                               _parse_list, "client request headers passed on to backends")

    @classmethod
    def load(cls, *, config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
             cli: Mapping[str, Any] | None = None, **overrides: Any) -> "Settings":
        """Resolve defaults < Flask ``config`` < ``env`` < ``cli`` (by field name) < ``overrides``."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key, parse = f.metadata["env"], f.metadata["parse"]
            layers = [("Flask config", config or {}, key), ("environment", env or {}, key),
                      ("command line", cli or {}, f.name), ("arguments", overrides, f.name)]
            for source, mapping, name in layers:
                raw = mapping.get(name)
                if raw is None:
                    continue
                try:
                    values[f.name] = parse(raw)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(key, raw, source, str(exc)) from exc
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(sorted(unknown)[0], overrides[sorted(unknown)[0]], "arguments", "unknown setting")
        settings = cls(**values)
        settings._validate()
        return settings

    def _validate(self) -> None:
        host, _, port = self.bind.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError("IWSPROXY_BIND", self.bind, "settings", "expected HOST:PORT")
        if self.eject_max_s < self.eject_base_s:
            raise ConfigError("IWSPROXY_EJECT_MAX", self.eject_max_s, "settings", "must be >= IWSPROXY_EJECT_BASE")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("IWSPROXY_BACKOFF_MAX", self.backoff_max_s, "settings",
                              "must be >= IWSPROXY_BACKOFF_INITIAL")
        if self.routes:
            shown = ";".join(f"{prefix}={','.join(urls)}" for prefix, urls in self.routes)
            if self.backends and any(is_catch_all(prefix, self.proxy_prefix) for prefix, _ in self.routes):
                raise ConfigError("IWSPROXY_ROUTES", shown, "settings",
                                  "a catch-all route and IWSPROXY_BACKENDS both give the default pool: give one")
            if self.workers > 1 and not self.redis_url:
                raise ConfigError("IWSPROXY_ROUTES", shown, "settings",
                                  "routes with more than one worker (IWSPROXY_WORKERS) need IWSPROXY_REDIS_URL: "
                                  "the workers' master shares the default pool only")
            for prefix, _ in self.routes:
                if self.proxy_prefix and not prefix_matches(self.proxy_prefix, prefix):
                    raise ConfigError("IWSPROXY_ROUTES", shown, "settings",
                                      f"route {prefix} is not under IWSPROXY_PROXY_PREFIX {self.proxy_prefix}")
        self._validate_buffering()

    def _validate_buffering(self) -> None:
        """With at-least-once delivery or resume on, what is written to a live peer is held until it is
        acknowledged: the buffers must be able to hold the largest message."""
        if self.delivery != "at-least-once" and not self.resume_grace_s:
            return
        why = "with at-least-once delivery or resume on"
        if self.global_buffer_limit_bytes < self.max_message_size_bytes:
            raise ConfigError("IWSPROXY_GLOBAL_BUFFER_LIMIT", self.global_buffer_limit_bytes, "settings",
                              f"must be >= IWSPROXY_MAX_MESSAGE_SIZE ({self.max_message_size_bytes}) {why}: "
                              "a larger message could never be held")
        if self.buffer_limit_bytes < 2:
            raise ConfigError("IWSPROXY_BUFFER_LIMIT", self.buffer_limit_bytes, "settings",
                              f"must be >= 2 bytes {why}: a sender is held back at half of it")

    def replace(self, **changes: Any) -> "Settings":
        return Settings.load(**{**dataclasses.asdict(self), **changes})

    @property
    def bind_address(self) -> tuple[str, int]:
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]"), int(port)


_SECRETS = frozenset({"admin_token", "resume_secret"})


def describe(settings: Settings) -> list[tuple[str, str, Any, str]]:
    """(field name, environment name, value, help) for each setting; secrets (the tokens, a
    password in the Redis URL) are masked."""
    rows = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name in _SECRETS and value:
            value = "***"
        elif f.name == "redis_url" and value:
            value = _without_password(value)
        rows.append((f.name, f.metadata["env"], value, f.metadata["help"]))
    return rows


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
