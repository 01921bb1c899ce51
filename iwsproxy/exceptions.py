"""The one exception hierarchy of iwsproxy.

::

    IwsProxyError
    ├── ConfigError              a setting has an invalid value (names key, value, source)
    ├── BufferOverflow           a client's (or the process's) buffered bytes passed the cap (-> close 1013)
    ├── CapacityExceeded         too many pipes in the process or from one IP (-> HTTP 503 / 429)
    ├── DuplicateClient          a live pipe already has this client id (-> HTTP 409)
    ├── ResumeRefused            a resume or takeover without a valid token (-> HTTP 403)
    ├── ProtocolError            a peer broke RFC 6455; carries the close code to answer with
    │   └── MessageTooBig        a message passed the size limit (close code 1009)
    ├── NoBackendAvailable       every backend was tried or none is usable (-> HTTP 503)
    ├── SnapshotError            a session snapshot is not whole, not valid, or of an unknown version
    └── BackendError             something went wrong with one backend
        ├── BackendConnectError  TCP/TLS/handshake failed or timed out
        └── BackendRejected      the backend answered the handshake with an HTTP error status

Third-party errors (socket, websocket-client) are translated into these once,
in :mod:`iwsproxy.io`, with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "IwsProxyError",
    "ConfigError",
    "BufferOverflow",
    "DuplicateClient",
    "CapacityExceeded",
    "ResumeRefused",
    "ProtocolError",
    "MessageTooBig",
    "NoBackendAvailable",
    "SnapshotError",
    "BackendError",
    "BackendConnectError",
    "BackendRejected",
]


class IwsProxyError(Exception):
    """Root of every error raised by iwsproxy."""


class ConfigError(IwsProxyError, ValueError):
    """A setting has an invalid value."""

    def __init__(self, key: str, value: object, source: str, problem: str):
        self.key, self.value, self.source, self.problem = key, value, source, problem
        super().__init__(f"{key}={value!r} (from {source}): {problem}")


class BufferOverflow(IwsProxyError):
    """A client's buffered bytes would pass its cap."""

    def __init__(self, size: int, limit: int, scope: str = "client"):
        self.size, self.limit, self.scope = size, limit, scope
        super().__init__(f"{scope} buffer would hold {size} bytes, limit is {limit}")


class DuplicateClient(IwsProxyError):
    """A live pipe already serves this client id."""


class CapacityExceeded(IwsProxyError):
    """The process has as many pipes as it may (``status`` 503), or the client's IP has (429)."""

    def __init__(self, detail: str, status: int = 503):
        self.status = status
        super().__init__(detail)


class ResumeRefused(IwsProxyError):
    """A resume or takeover did not present a valid token."""


class ProtocolError(IwsProxyError):
    """A peer broke the WebSocket protocol; ``close_code`` is the code to answer with."""

    close_code = 1002
    events: list = []  # complete messages that arrived before the violation, set by the parser

    def __init__(self, reason: str, close_code: int | None = None):
        if close_code is not None:
            self.close_code = close_code
        self.reason = reason
        super().__init__(f"{self.close_code}: {reason}")


class MessageTooBig(ProtocolError):
    """A message (or a frame's declared length) passed the size limit."""

    close_code = 1009


class NoBackendAvailable(IwsProxyError):
    """No backend could be used; ``tried`` lists each URL tried with its error."""

    def __init__(self, tried: list[tuple[str, BaseException]] | None = None, detail: str = ""):
        self.tried = list(tried or [])
        parts = [f"{url}: {exc}" for url, exc in self.tried]
        msg = detail or ("no backend available" if not parts else "all backends failed")
        if parts:
            msg += " (" + "; ".join(parts) + ")"
        super().__init__(msg)


class SnapshotError(IwsProxyError):
    """A session snapshot cannot be read (bad magic, unknown version, truncated, corrupted,
    inconsistent) or written (see :mod:`iwsproxy.snapshot`)."""


class BackendError(IwsProxyError):
    """Something went wrong with one backend (``url``)."""

    def __init__(self, url: str, detail: str):
        self.url, self.detail = url, detail
        super().__init__(f"{url}: {detail}")


class BackendConnectError(BackendError):
    """Connecting to the backend failed (TCP, TLS, or the WebSocket handshake)."""


class BackendRejected(BackendError):
    """The backend answered the handshake with an HTTP error status."""

    def __init__(self, url: str, status: int, detail: str = ""):
        self.status = status
        super().__init__(url, detail or f"handshake refused with HTTP {status}")
