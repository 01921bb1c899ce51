"""The client edge: a gevent-websocket handler that lets the app decide before upgrading.

geventwebsocket's stock ``WebSocketHandler`` answers ``101 Switching Protocols``
before it calls the WSGI app, so the app can no longer refuse a client with an
HTTP status. :class:`ProxyHandler` validates the handshake, then calls the app
with a :class:`ClientUpgrade` in the environ (key :data:`UPGRADE_KEY`). The app
either returns an ordinary response (400, 409, 503... reach the client as HTTP)
or calls :meth:`ClientUpgrade.accept`, which sends the 101 and returns the
client :class:`~iwsproxy.io.connection.Connection`; whatever the app returns
after that is discarded.

The connection then belongs to the app, not to the request: its socket is
detached from the HTTP server, so the request's greenlet ends while the
connection lives on (a pipe needs no greenlet while it is idle). A TLS socket
cannot leave its server that way; for it the request waits until the
connection is closed.

The data phase does not go through gevent-websocket's ``WebSocket`` class
(which unmasks byte by byte in Python): frames are parsed by
:mod:`iwsproxy.frames` straight from the socket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import os
import re
import socket

import gevent

from gevent.pywsgi import WSGIHandler
from geventwebsocket.handler import WebSocketHandler

from .connection import Connection
from .handoff import prefixed_reader

__all__ = ["ProxyHandler", "ClientUpgrade", "UPGRADE_KEY", "is_upgrade_request"]

UPGRADE_KEY = "iwsproxy.upgrade"
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_MAX_HEADER_SIZE_BYTES = 32 * 1024
_LINGER_S, _LINGER_BYTES = 1.0, 1024 * 1024  # after refusing a request we could not read to its end
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_LINE_BREAK_OR_NUL = re.compile("[\r\n\0]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 7230 3.2.6; a subprotocol is one (RFC 6455 4.1)


class _HeadersTooLarge(ValueError):
    """The request's header lines are over the cap (answered 431)."""


class _CappedHeaderReader:
    """The request's reader as http.client's header parser uses it (``readline`` only): it hands
    out at most ``limit`` bytes, then raises :class:`_HeadersTooLarge`. gevent's own bounds, 100
    lines of 64 KiB, let a client have 6.5 MB read and kept for it before the app sees a header."""

    def __init__(self, rfile, limit: int):
        self._rfile = rfile
        self._left = limit

    def readline(self, size: int = -1) -> bytes:
        wanted = self._left + 1 if size < 0 else min(size, self._left + 1)
        line = self._rfile.readline(wanted)
        self._left -= len(line)
        if self._left < 0:
            raise _HeadersTooLarge("request header fields too large")
        return line


def _plain_response(status: str, reason: str) -> bytes:
    """A whole HTTP response with a text body, for answers given before a WSGI environ exists."""
    body = (reason + "\n").encode()
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


_HEADERS_TOO_LARGE = _plain_response("431 Request Header Fields Too Large", "request header fields too large")


def is_upgrade_request(environ: dict) -> bool:
    return (environ.get("HTTP_UPGRADE", "").lower() == "websocket"
            and "upgrade" in environ.get("HTTP_CONNECTION", "").lower())


def _offered_subprotocols(environ: dict) -> list[str]:
    return [p.strip() for p in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",") if p.strip()]


def _handshake_problem(environ: dict, http_version: str) -> tuple[str, str, list] | None:
    """RFC 6455 4.2.1 checks; returns (status, reason, headers) for a bad request."""
    if environ.get("REQUEST_METHOD") != "GET":
        return "405 Method Not Allowed", "a WebSocket upgrade must use GET", [("Allow", "GET")]
    if http_version != "HTTP/1.1":
        return "400 Bad Request", "a WebSocket upgrade needs HTTP/1.1", []
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return "426 Upgrade Required", "unsupported Sec-WebSocket-Version (13 is supported)", [
            ("Sec-WebSocket-Version", "13")]
    if _has_line_breaks_or_nul(environ):
        return "400 Bad Request", "a header or the query holds CR, LF or NUL (obsolete line folding is refused)", []
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        return "400 Bad Request", "missing or invalid Sec-WebSocket-Key", []
    if not all(_TOKEN.fullmatch(p) for p in _offered_subprotocols(environ)):
        return "400 Bad Request", "Sec-WebSocket-Protocol must be a list of tokens", []
    if _has_body(environ):
        return "400 Bad Request", "a WebSocket upgrade has no body (no Content-Length or Transfer-Encoding)", []
    return None


def _has_line_breaks_or_nul(environ: dict) -> bool:
    """Does a header value or the query hold CR, LF or NUL? gevent keeps an obsolete folded line
    (a line starting with a space) in the value of the header before it, CRLF and all: passed on
    to a backend, that is a header of the client's making (RFC 7230 3.2.4 allows 400 for it)."""
    return any(_LINE_BREAK_OR_NUL.search(value) for name, value in environ.items()
               if (name.startswith("HTTP_") or name == "QUERY_STRING") and isinstance(value, str))


def _has_body(environ: dict) -> bool:
    """Does the request announce a body? An upgrade must not: after the headers the client's bytes
    are frames. gevent would also read the announced body after our answer, from a reader that the
    accepted connection has already closed (a crash after the 101)."""
    length = environ.get("CONTENT_LENGTH", "").strip()
    return (length.strip("0") != "" or "HTTP_TRANSFER_ENCODING" in environ)  # "", "0", "00": none


class ClientUpgrade:
    """A validated upgrade request, not yet answered."""

    def __init__(self, handler: "ProxyHandler"):
        self._handler = handler
        environ = handler.environ
        self.environ = environ
        self.key = environ["HTTP_SEC_WEBSOCKET_KEY"].strip()
        self.subprotocols = _offered_subprotocols(environ)
        address = handler.client_address
        self.remote_addr = address[0] if isinstance(address, tuple) else str(address or "")
        self.server = handler.server
        self.server_pool = getattr(handler.server, "pool", None)  # where a shutdown can make the server wait
        self.connection: Connection | None = None
        self.response_headers: list[tuple[str, str]] = []  # added to the 101 by accept(), to no other answer
        self.detached = False
        self.handed_in = handler.handed_in    # another process of this host sent us this request
        self.handed_over = False              # this request went to another process, which answers it

    @property
    def accepted(self) -> bool:
        return self.connection is not None

    def hand_over(self, send) -> bool:
        """Give the unanswered request, socket and all, to another process of this host.

        ``send(sock, address, request)`` passes them on (see :mod:`iwsproxy.io.handoff`); on
        success this request ends without an answer and the socket is no longer ours. If it
        fails, or the socket is TLS, the request is left as it was, to be served here.
        """
        handler = self._handler
        if hasattr(handler.socket, "do_handshake"):
            return False  # a TLS session cannot move to another process
        head = handler.requestline + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in handler.headers.items())
        buffered = handler.take_buffered_input()
        sock = handler.socket
        if not send(sock, handler.client_address, head.encode("latin-1") + b"\r\n" + buffered):
            handler.rfile = prefixed_reader(buffered, sock)
            return False
        os.close(sock.detach())  # the other process has its own descriptor; the server closes an empty shell
        handler.close_connection = True
        self.handed_over = True
        return True

    def accept(self, subprotocol: str | None = None, *, max_message_size: int,
               max_fragments: int = 1024) -> Connection:
        """Answer 101 (with the chosen subprotocol and :attr:`response_headers`) and return the
        client connection."""
        if self.connection is not None:
            raise RuntimeError("upgrade already accepted")
        if subprotocol is not None and subprotocol not in self.subprotocols:
            raise ValueError(f"subprotocol {subprotocol!r} was not offered by the client")
        accept = base64.b64encode(hashlib.sha1((self.key + _GUID).encode("ascii")).digest()).decode("ascii")
        lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Accept: {accept}"]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        lines.extend(f"{name}: {value}" for name, value in self.response_headers)
        handler = self._handler
        handler.socket.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        handler.mark_upgraded()
        prefix = handler.take_buffered_input()
        sock = handler.socket
        if not hasattr(sock, "do_handshake"):  # not TLS: take the descriptor; the server closes an empty shell
            sock = type(sock)(fileno=sock.detach())
            self.detached = True
        self.connection = Connection(sock, server_side=True, max_message_size=max_message_size,
                                     max_fragments=max_fragments, prefix=prefix)
        return self.connection


class ProxyHandler(WebSocketHandler):
    """A ``WebSocketHandler`` that asks the app before switching protocols.

    It also bounds the time a client may take to send its request line and
    headers (``handshake_timeout_s`` of the app's settings, 10 s if the app is
    not an iwsproxy one): a slow or incomplete request is dropped.
    """

    _handshake_timer: gevent.Timeout | None = None
    handed_in = False  # set on a handler serving a request that another process handed over

    def _setting(self, name: str, default):
        """A setting of the app being served, or ``default`` if the app is not an iwsproxy one."""
        extensions = getattr(self.server.application, "extensions", {})
        state = extensions.get("iwsproxy") if isinstance(extensions, dict) else None
        return getattr(state.settings, name) if state is not None else default

    def _handshake_timeout_s(self) -> float:
        return self._setting("handshake_timeout_s", DEFAULT_HANDSHAKE_TIMEOUT_S)

    def MessageClass(self, fp, *args):  # gevent reads the request headers through this
        limit = self._setting("max_header_size_bytes", DEFAULT_MAX_HEADER_SIZE_BYTES)
        return super().MessageClass(_CappedHeaderReader(fp, limit), *args)

    def _handle_client_error(self, ex):
        """gevent's answer to a request it could not read, except for too many or too large headers:
        431, and no traceback (http.client's "got more than 100 headers" is not a ValueError, so
        gevent would print one for it)."""
        if isinstance(ex, (_HeadersTooLarge, http.client.HTTPException)):
            self.log_error("(from %s) %s", self.client_address, ex)
            self._answer_and_linger(_HEADERS_TOO_LARGE)
            return None  # answered; the connection is closed
        return super()._handle_client_error(ex)

    def _answer_and_linger(self, response: bytes) -> None:
        """Send ``response``, end our side, then read what the client is still sending (for at most
        1 s and 1 MiB) before the server closes: closing on unread bytes resets the connection, and
        the reset can destroy the answer before the client has read it (the rest of its headers are
        still on the way when we answer)."""
        self.close_connection = True
        try:
            self.socket.sendall(response)
            self.socket.shutdown(socket.SHUT_WR)
            with gevent.Timeout(_LINGER_S, False):
                left = _LINGER_BYTES
                while left > 0 and (chunk := self.rfile.read1(65536)):
                    left -= len(chunk)
        except OSError:
            pass  # the client is gone: nothing more to do

    def read_requestline(self):
        seconds = self._handshake_timeout_s()
        if seconds:
            self._handshake_timer = gevent.Timeout(seconds, socket.timeout("request not received in time"))
            self._handshake_timer.start()
        return super().read_requestline()

    def get_environ(self):
        """The WSGI environ, plus ``RAW_URI``: the request target as the client sent it (gevent's
        ``PATH_INFO`` has its percent escapes decoded), so that a path passes on unchanged."""
        self._cancel_handshake_timer()  # the request line and headers are in
        environ = super().get_environ()
        environ.setdefault("RAW_URI", self.path)
        return environ

    def _cancel_handshake_timer(self) -> None:
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None:
            timer.close()

    def handle_one_request(self):
        try:
            return super().handle_one_request()
        finally:
            self._cancel_handshake_timer()

    def take_buffered_input(self) -> bytes:
        """What the HTTP reader buffered past the request; then close the reader (and free its buffer).

        From here on the connection reads the socket directly.
        """
        sock, rfile = self.socket, self.rfile
        timeout = sock.gettimeout()
        sock.settimeout(0.0)  # drain without waiting: read1 returns b"" when only the socket is left
        chunks = []
        try:
            while chunk := rfile.read1(65536):
                chunks.append(chunk)
        except OSError:
            pass
        finally:
            sock.settimeout(timeout)
        rfile.close()  # the socket stays open; the 8 KiB buffer is released
        return b"".join(chunks)

    def mark_upgraded(self) -> None:
        self.status = b"101 Switching Protocols"
        self._orig_status = "101 Switching Protocols"
        self.code = 101
        self.headers_sent = True
        self.close_connection = True

    def run_application(self):
        environ = self.environ
        if not is_upgrade_request(environ):
            return WSGIHandler.run_application(self)
        problem = _handshake_problem(environ, self.request_version)
        if problem is not None:
            status, reason, headers = problem
            body = (reason + "\n").encode()
            self.start_response(status, headers + [("Content-Type", "text/plain; charset=utf-8"),
                                                   ("Content-Length", str(len(body)))])
            self.result = [body]
            self.close_connection = True
            self.process_result()
            return None
        upgrade = ClientUpgrade(self)
        environ[UPGRADE_KEY] = upgrade

        def start_response(status, headers, exc_info=None):
            if upgrade.accepted or upgrade.handed_over:
                return lambda data: None  # the HTTP exchange is over; the app's response is moot
            return self.start_response(status, headers, exc_info)

        result = None
        taken = False
        try:
            result = self.application(environ, start_response)
            if not upgrade.accepted and not upgrade.handed_over:
                self.result = result
                self.process_result()
            taken = True
        finally:
            environ.pop(UPGRADE_KEY, None)  # the upgrade refers back to this handler: reference counting frees both
            self.result = None
            close = getattr(result, "close", None)
            if close is not None:
                close()
            connection = upgrade.connection
            if connection is not None:
                if not taken:
                    connection.abort()  # the app failed after accepting: nobody owns the connection
                elif not upgrade.detached:
                    connection.wait_closed()  # TLS: the socket lives as long as this request
        return None

    def log_request(self):
        WSGIHandler.log_request(self)

