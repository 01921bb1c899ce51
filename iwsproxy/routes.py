"""Routes: backend pools chosen by the request path's prefix.  [pure]

A route is ``(prefix, urls)``: a request whose path is the prefix or starts
with the prefix followed by ``/`` goes to that route's pool (whole path
segments: ``/chat`` matches ``/chat`` and ``/chat/x``, never ``/chatroom``).
The longest matching prefix wins; ``/`` matches every path. A route's pool is
named by its prefix; the pool of the ``--backend`` URLs is named
:data:`DEFAULT_POOL`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

__all__ = ["DEFAULT_POOL", "Route", "check_ws_url", "parse_routes", "prefix_matches", "match_route"]

DEFAULT_POOL = "default"

Route = tuple[str, tuple[str, ...]]  # (prefix, backend URLs)


def check_ws_url(url: str) -> str:
    """Return ``url`` if it is a ws:// or wss:// URL with a host (and a valid port), else raise ValueError."""
    if not isinstance(url, str):
        raise ValueError("a backend URL must be a string")
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as exc:
        raise ValueError(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{url!r} is not a ws:// or wss:// URL with a host")
    return url


def _normal_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str) or not prefix.strip().startswith("/"):
        raise ValueError(f"route prefix {prefix!r} must start with /")
    prefix = prefix.strip()
    if any(char in prefix for char in "?#") or any(char.isspace() for char in prefix):
        raise ValueError(f"route prefix {prefix!r} must be a path (no query, fragment or space)")
    return prefix.rstrip("/") or "/"


def _one_route(item: Any) -> Route:
    if isinstance(item, str):
        prefix, sep, urls = item.partition("=")
        if not sep:
            raise ValueError(f"route {item!r} is not PREFIX=URL[,URL...]")
        urls = urls.split(",")
    else:
        prefix, urls = item
        urls = urls.split(",") if isinstance(urls, str) else list(urls)
    urls = tuple(check_ws_url(url.strip()) for url in urls if url and url.strip())
    if not urls:
        raise ValueError(f"route {prefix!r} has no backend URL")
    return _normal_prefix(prefix), urls


def parse_routes(value: Any) -> tuple[Route, ...]:
    """Routes from ``"/a=ws://x,ws://y;/b=ws://z"`` (the environment's form), a list of
    ``"PREFIX=URL[,URL...]"`` (the repeatable flag), a list of ``(prefix, urls)`` pairs or a
    ``{prefix: urls}`` mapping (Flask config). ValueError for a malformed route, a bad URL or
    a prefix given twice."""
    if isinstance(value, str):
        items = [part for part in value.split(";") if part.strip()]
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        items = list(value)
    routes = tuple(_one_route(item) for item in items)
    prefixes = [prefix for prefix, _ in routes]
    for prefix in prefixes:
        if prefixes.count(prefix) > 1:
            raise ValueError(f"route prefix {prefix!r} given twice")
    return routes


def prefix_matches(prefix: str, path: str) -> bool:
    """Does ``path`` lie under ``prefix``, by whole segments?"""
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def match_route(routes: tuple[Route, ...], path: str) -> str | None:
    """The prefix of the longest route ``path`` lies under; None if none does."""
    matching = [prefix for prefix, _ in routes if prefix_matches(prefix, path)]
    return max(matching, key=len) if matching else None
