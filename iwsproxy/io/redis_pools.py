"""The Redis registries of a proxy with routes: one :class:`RedisRegistry` per pool.

Each pool's backend set lives under a key prefix of its own, with its own change
channel, and is kept exactly as :mod:`iwsproxy.io.redis_registry` describes (seeding,
epoch, drains, Redis down)::

    iwsproxy:...                   the default pool (the same keys as a proxy without routes)
    iwsproxy:pool:<prefix>:...     the pool of the route <prefix>, percent-encoded (/chat -> /chat,
                                   /a:b -> /a%3Ab): iwsproxy:pool:/chat:backends, channel
                                   iwsproxy:pool:/chat:<db>:changes, ...

So a data set written by a proxy without routes is the default pool's as it is, and
processes share a route's backends when they have a route with the same prefix: the
routes themselves are each process's settings (give every process the same ones),
the backends in them are shared. A route's URLs given at start only seed a new set,
as ``--backend`` URLs do. Each pool has its own pub/sub connection and subscriber
greenlet in each process.
"""

from __future__ import annotations

from typing import Callable
from urllib.parse import quote

from ..routes import DEFAULT_POOL
from .redis_registry import RedisRegistry

__all__ = ["pool_key_prefix", "redis_registries"]

KEY_PREFIX = "iwsproxy"


def pool_key_prefix(pool: str) -> str:
    """The Redis key prefix of the pool named ``pool`` (see the module docstring)."""
    return KEY_PREFIX if pool == DEFAULT_POOL else f"{KEY_PREFIX}:pool:{quote(pool, safe='/')}"


def redis_registries(url: str) -> tuple[RedisRegistry, Callable[[str], RedisRegistry]]:
    """The default pool's registry and a maker of each route pool's, all on the Redis at ``url``
    (the ``registry`` and ``pool_registry`` of :class:`~iwsproxy.io.manager.PipeManager`).
    ConfigError for a malformed URL."""
    return (RedisRegistry(url, key_prefix=pool_key_prefix(DEFAULT_POOL)),
            lambda pool: RedisRegistry(url, key_prefix=pool_key_prefix(pool)))
