"""The backend edge: websocket-client opens the connection, our codec carries the data.

websocket-client does what it is good at (URL parsing, TCP and TLS, proxies,
the HTTP handshake); once the handshake is done the raw socket is framed by
:class:`~iwsproxy.io.connection.Connection`, which reads whole chunks and
writes batches in one call instead of websocket-client's several reads per
frame. Its errors are translated into the :mod:`iwsproxy.exceptions` tree here.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import gevent
import websocket

from ..exceptions import BackendConnectError, BackendRejected
from ..frames import MaskSource
from ..routes import check_ws_url
from .connection import Connection

__all__ = ["ClientOffer", "BackendConnection", "backend_target", "connect_backend", "check_backend_url",
           "tls_options", "url_allowed"]

CLIENT_ID_HEADER = "X-Iwsproxy-Client-Id"
RECONNECTS_HEADER = "X-Iwsproxy-Reconnects"


def check_backend_url(url: str) -> str:
    """Return ``url`` if it is a ws:// or wss:// URL with a host, else raise ValueError."""
    return check_ws_url(url)


def tls_options(*, verify: bool, ca_bundle: str | None) -> dict:
    """websocket-client's ``sslopt`` for wss:// backends: verification on unless turned off."""
    if not verify:
        return {"cert_reqs": ssl.CERT_NONE, "check_hostname": False}
    options: dict = {"cert_reqs": ssl.CERT_REQUIRED, "check_hostname": True}
    if ca_bundle:
        options["ca_certs"] = ca_bundle
    return options


def url_allowed(url: str, allowlist: tuple[str, ...]) -> bool:
    """Does ``url``'s host match an entry: ``host``, ``host:port`` or a CIDR network? Empty list: yes."""
    if not allowlist:
        return True
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in allowlist:
        entry = entry.strip().lower()
        if "/" in entry:
            try:
                if address is not None and address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
            continue
        name, entry_port = _host_and_port(entry)
        if name == host and entry_port in (None, port):
            return True
    return False


def _host_and_port(entry: str) -> tuple[str, int | None]:
    """An allowlist entry's host and port: ``host``, ``host:port``, an IPv6 address bare or in
    brackets, ``[v6]:port``."""
    if entry.startswith("["):
        name, _, rest = entry[1:].partition("]")
        return name, int(rest[1:]) if rest[1:].isdigit() else None
    name, colon, entry_port = entry.rpartition(":")
    if colon and ":" not in name and entry_port.isdigit():
        return name, int(entry_port)
    return entry, None  # a name, or a bare IPv6 address (its colons are not a port's)


@dataclass(frozen=True)
class ClientOffer:
    """What a client's handshake asks of every backend its pipe will use.

    ``path`` is the client's path as it sent it (percent escapes kept), given to a backend URL
    that has no path of its own; ``query`` is added to the backend URL's own query.
    """
    client_id: str
    query: str = ""
    subprotocols: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    origin: str | None = None
    remote_addr: str = ""
    path: str = ""


class BackendConnection(Connection):
    __slots__ = ("url", "subprotocol")

    def __init__(self, url: str, sock: socket.socket, subprotocol: str | None, *, max_message_size: int,
                 max_fragments: int = 1024, mask_source: MaskSource | None = None):
        super().__init__(sock, server_side=False, max_message_size=max_message_size, max_fragments=max_fragments,
                         mask_source=mask_source)
        self.url = url
        self.subprotocol = subprotocol


OFFERED = object()  # connect_backend's subprotocol for a session's first backend: the client's offer


def backend_target(url: str, path: str, query: str) -> str:
    """The URL a backend is asked for, as nginx's ``proxy_pass`` builds it: a backend URL without a
    path (``ws://host:9000``) gets the client's ``path``; one with a path (``ws://host:9000/`` too)
    keeps its own. The client's ``query`` follows the backend URL's own query, if any."""
    parts = urlsplit(url)
    target_path = parts.path or path or "/"
    if not query and target_path == parts.path:
        return url
    merged = f"{parts.query}&{query}" if parts.query and query else parts.query or query
    return urlunsplit((parts.scheme, parts.netloc, target_path, merged, parts.fragment))


def connect_backend(url: str, offer: ClientOffer, *, reconnects: int, timeout_s: float,
                    max_message_size: int, max_fragments: int = 1024, subprotocol: str | None | object = OFFERED,
                    sslopt: dict | None = None, mask_source: MaskSource | None = None) -> BackendConnection:
    """Open a backend connection for one pipe.

    For the session's first backend (``subprotocol=OFFERED``) the client's
    subprotocol offer is passed on and the backend's choice must be one of it.
    Later backends must speak what the client was told in its 101: they are
    offered only ``subprotocol``, the first backend's choice, and must pick it (or,
    if it is None, are offered none and must pick none). Raises
    :class:`BackendRejected` for an HTTP error status and
    :class:`BackendConnectError` for everything else.
    """
    if subprotocol is OFFERED:
        offered = list(offer.subprotocols)
    else:
        offered = [subprotocol] if subprotocol else []
    headers = [f"{name}: {value}" for name, value in offer.headers]
    headers.append(f"{CLIENT_ID_HEADER}: {offer.client_id}")
    headers.append(f"{RECONNECTS_HEADER}: {reconnects}")
    if offer.remote_addr:
        headers.append(f"X-Forwarded-For: {offer.remote_addr}")
    if offered:
        # passed as a plain header so that a backend choosing none is not an error
        headers.append("Sec-WebSocket-Protocol: " + ", ".join(offered))
    options = dict(header=headers, skip_utf8_validation=True, enable_multithread=False,
                   sockopt=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),), sslopt=sslopt or {})
    if offer.origin:
        options["origin"] = offer.origin
    else:
        options["suppress_origin"] = True
    try:
        with gevent.Timeout(timeout_s, BackendConnectError(url, f"handshake not done within {timeout_s:g} s")):
            ws = websocket.create_connection(backend_target(url, offer.path, offer.query), timeout=timeout_s, **options)
    except websocket.WebSocketBadStatusException as exc:
        raise BackendRejected(url, exc.status_code) from exc
    except (OSError, ssl.SSLError, websocket.WebSocketException, ValueError) as exc:
        raise BackendConnectError(url, str(exc) or type(exc).__name__) from exc
    chosen = (ws.getheaders() or {}).get("sec-websocket-protocol")
    sock = ws.sock
    if chosen is not None:
        chosen = chosen.strip()
        match = [p for p in offered if p == chosen] or [p for p in offered if p.lower() == chosen.lower()]
        if not match:
            sock.close()
            raise BackendConnectError(url, f"backend chose subprotocol {chosen!r}, not one offered {offered}")
        chosen = match[0]
    if subprotocol is not OFFERED and chosen != subprotocol:
        sock.close()
        raise BackendConnectError(url, f"backend did not accept subprotocol {subprotocol!r}")
    sock.settimeout(None)  # create_connection leaves its timeout on the socket; reads must block
    return BackendConnection(url, sock, chosen, max_message_size=max_message_size, max_fragments=max_fragments,
                             mask_source=mask_source)
