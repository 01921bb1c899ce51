"""Routes: backend pools chosen by the request path's prefix.  [pure]

A route is ``(prefix, urls)``: a request whose path is the prefix or starts
with the prefix followed by ``/`` goes to that route's pool (whole path
segments: ``/chat`` matches ``/chat`` and ``/chat/x``, never ``/chatroom``).
The longest matching prefix wins; ``/`` matches every path.

Pools. The *default* pool (named :data:`DEFAULT_POOL`) is the catch-all: it
holds the ``--backend`` URLs and serves every path under no other route. A
route whose prefix covers every proxied path (``/``, or the proxy prefix
itself) is another way to write the catch-all: its URLs go to the default
pool, so the pool is named ``default`` wherever it is shown or named (admin
API, CLI, status page, Redis). Every other route's pool is named by its
prefix. With no routes the default pool is the only one. With routes but
neither ``--backend`` URLs nor a catch-all route, there is no default pool: a
path under no route gets 404 and naming ``default`` is naming an unknown pool.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

__all__ = ["DEFAULT_POOL", "Route", "check_ws_url", "parse_routes", "prefix_matches", "match_route", "is_catch_all",
           "pool_seeds", "pool_for_path", "has_dot_segment"]

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


def is_catch_all(prefix: str, proxy_prefix: str = "") -> bool:
    """Does a route with ``prefix`` cover every path the proxy serves (``/``, or the proxy prefix)?"""
    return prefix == (proxy_prefix.rstrip("/") or "/")


def pool_seeds(routes: tuple[Route, ...], backends: tuple[str, ...] = (),
               proxy_prefix: str = "") -> dict[str, tuple[str, ...]]:
    """The pools of a proxy and the URLs each starts with: :data:`DEFAULT_POOL` first (the
    ``backends`` and a catch-all route's URLs) unless routes are set and neither is given,
    then each other route's pool, named by its prefix."""
    seeds: dict[str, tuple[str, ...]] = {}
    catch_all = tuple(url for prefix, urls in routes if is_catch_all(prefix, proxy_prefix) for url in urls)
    if not routes or backends or catch_all:
        seeds[DEFAULT_POOL] = tuple(dict.fromkeys((*backends, *catch_all)))
    for prefix, urls in routes:
        if not is_catch_all(prefix, proxy_prefix):
            seeds[prefix] = urls
    return seeds


def pool_for_path(routes: tuple[Route, ...], path: str, *, has_default: bool, proxy_prefix: str = "") -> str | None:
    """The name of the pool serving ``path``: the longest route it lies under, else the default
    pool if there is one (``has_default``); None (404) if neither."""
    prefix = match_route(routes, path)
    if prefix is None or is_catch_all(prefix, proxy_prefix):
        return DEFAULT_POOL if has_default else None
    return prefix


def has_dot_segment(path: str) -> bool:
    """Does the (decoded) ``path`` have a ``.`` or ``..`` segment? Such a path names one route here
    and, once a backend or another proxy normalises it, another (``/chat/../admin``): with
    routes it is refused."""
    return any(segment in (".", "..") for segment in path.split("/"))
