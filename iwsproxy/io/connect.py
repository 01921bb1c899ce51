"""One connect round of a pipe: each usable backend of the pool tried once, in the pool's order."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..exceptions import BackendError, BackendRejected
from .backend import OFFERED, BackendConnection, ClientOffer, connect_backend
from .ports import BackendLeases, BackendOptions

if TYPE_CHECKING:
    from ..pool import Backend
    from ..session import ConnectBackend, Session
    from ..settings import Settings

__all__ = ["connect_round"]

log = logging.getLogger(__name__)


def connect_round(round_: "ConnectBackend", session: "Session", offer: ClientOffer, *, leases: BackendLeases,
                  settings: "Settings", options: BackendOptions, subprotocol: str | None | object = OFFERED,
                  first: bool = False, name: str = "") -> tuple[BackendConnection | None, "Backend | None", list]:
    """Lease backends and try them once each (leaving out ``round_.avoid`` unless it is the only
    one) until a handshake completes or the session no longer needs a backend.

    ``subprotocol`` is the one the client's session speaks (or ``OFFERED``: the client's offer,
    before it is answered). ``first``: no backend connected yet, so a backend's 4xx refusal is
    the client's own answer and raises :class:`BackendRejected`; later it only fails that backend.
    Returns ``(connection, lease, tried)``, connection and lease None if none was connected;
    ``tried`` lists ``(url, error)`` for the backends that failed. ``name`` prefixes log lines.
    """
    exclude = {round_.avoid} if round_.avoid and leases.pool_size() > 1 else set()
    tried: list = []
    while session.needs_backend and not session.closed:
        lease = leases.acquire_backend(exclude)
        if lease is None:
            break
        url = lease.url
        exclude.add(url)
        try:
            conn = connect_backend(url, offer, reconnects=session.generation, timeout_s=settings.connect_timeout_s,
                                   max_message_size=settings.max_message_size_bytes,
                                   max_fragments=settings.max_fragments, sslopt=options.sslopt,
                                   mask_source=options.mask_source, subprotocol=subprotocol)
        except BackendRejected as exc:
            leases.release_backend(lease, failed=not first, cause=str(exc))
            if first and 400 <= exc.status < 500:
                raise  # the backend refused this client: it gets the same answer
            tried.append((url, exc))
            continue
        except BackendError as exc:
            leases.release_backend(lease, failed=True, cause=str(exc))
            tried.append((url, exc))
            log.warning("pipe %s: backend %s failed: %s", name, url, exc.detail)
            continue
        if session.closed:
            conn.abort()
            leases.release_backend(lease, failed=False)
            break
        return conn, lease, tried
    if tried and session.needs_backend and not first:
        log.warning("pipe %s: no backend reachable (%d tried)", name, len(tried))
    return None, None, tried
