"""Request policies decided before the upgrade: allowed origins, admin login throttling.  [pure]"""

from __future__ import annotations

from collections import deque
from urllib.parse import urlsplit

__all__ = ["origin_allowed", "FailureLimiter"]


def _split(origin: str) -> tuple[str, str, int | None]:
    parts = urlsplit(origin if "://" in origin else "//" + origin)
    try:
        port = parts.port
    except ValueError:
        port = -1  # malformed: matches nothing
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def origin_allowed(origin: str | None, host: str, allowed: tuple[str, ...], *, allow_missing: bool) -> bool:
    """May a browser page from ``origin`` open a WebSocket through the proxy?

    * no Origin header (non-browser clients): ``allow_missing``;
    * ``allowed`` empty: only the proxy's own origin (the Origin's host[:port] equals the Host header);
    * ``*`` allows any origin; ``https://app.example.com`` allows exactly that origin;
      ``https://*.example.com`` allows its subdomains; an entry without a scheme matches any scheme.
    """
    if origin is None:
        return allow_missing
    if not allowed:
        scheme, hostname, port = _split(origin)
        if ":" in hostname:  # an IPv6 address: bracketed in a Host header, as in the Origin
            hostname = f"[{hostname}]"
        netloc = hostname if port is None else f"{hostname}:{port}"
        return bool(hostname) and netloc == host.lower()
    scheme, hostname, port = _split(origin)
    if not hostname:
        return "*" in allowed
    for entry in allowed:
        if entry == "*":
            return True
        want_scheme, want_host, want_port = _split(entry)
        if want_scheme and want_scheme != scheme:
            continue
        if want_port != port:
            continue
        if want_host.startswith("*."):
            if hostname.endswith(want_host[1:]) and hostname != want_host[2:]:
                return True
        elif want_host == hostname:
            return True
    return False


class FailureLimiter:
    """At most ``max_failures`` failures per key within ``window_s``; then the key is blocked."""

    def __init__(self, max_failures: int, window_s: float = 60.0, max_keys: int = 10000):
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def blocked(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0: not blocked)."""
        times = self._recent(key, now)
        if len(times) < self.max_failures:
            return 0.0
        return max(0.0, times[0] + self.window_s - now)

    def failed(self, key: str, now: float) -> None:
        if key not in self._failures and len(self._failures) >= self.max_keys:
            self._failures.pop(next(iter(self._failures)))  # bounded memory: forget the oldest key
        times = self._recent(key, now)
        times.append(now)
        self._failures[key] = times
