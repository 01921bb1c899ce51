"""iwsproxy: an interruptible WebSocket proxy.

Clients keep one persistent session (a :class:`PersistentPipe`) while the
backend connection behind it fails over across a pool of backends.

The pure core (:mod:`iwsproxy.buffer`, :mod:`iwsproxy.session`,
:mod:`iwsproxy.pool`, :mod:`iwsproxy.backoff`, :mod:`iwsproxy.frames`,
:mod:`iwsproxy.settings`) imports no I/O library; the names below that need
gevent or Flask are imported lazily, on first use.
"""

from __future__ import annotations

from importlib import import_module

from .exceptions import *  # noqa: F401,F403
from .exceptions import __all__ as _exception_names
from .settings import Settings

__version__ = "0.1.0"

_LAZY = {
    "PipeManager": "iwsproxy.io.manager",
    "PersistentPipe": "iwsproxy.io.pipe",
    "ProxyHandler": "iwsproxy.io.client",
    "BackendPool": "iwsproxy.pool",
    "Session": "iwsproxy.session",
    "IWSProxy": "iwsproxy.app",
    "create_app": "iwsproxy.app",
}

__all__ = ["Settings", *_LAZY, *_exception_names]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'iwsproxy' has no attribute {name!r}")
