"""An echo WebSocket backend for the demo, the tests and the benchmark, run as its own process.

::

    python -m iwsproxy.tools.echo --port 0 [--host 127.0.0.1] [--name NAME] [--subprotocol P ...]
                            [--reject-status CODE] [--stream-interval-ms N]

It prints ``LISTENING <port>`` once bound, then echoes every text/binary message back
unchanged (one ``sendall`` per received chunk), answers PING with PONG and CLOSE with
CLOSE. A plain ``GET /stats`` returns JSON with connection counts and the headers and
path of the most recent upgrade request, so tests can see what a proxy forwarded.
SIGTERM or SIGINT stops it cleanly.

:class:`EchoProcess` runs it as a child process for tests and other modules.

The handshake is a small hand-written HTTP/1.1 parser and the data phase uses the
project's own codec (:mod:`iwsproxy.frames`), so the backend is fast enough not to be
the bottleneck of a benchmark.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http
import json
import logging
import signal
import socket
import sys

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.server

from iwsproxy.exceptions import ProtocolError
from iwsproxy.tools.process import ChildProcess
from iwsproxy.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    encode_close_payload,
    encode_frame,
    parse_close_payload,
)

__all__ = ["EchoServer", "EchoProcess", "main"]

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 256 * 1024
MAX_HANDSHAKE_BYTES = 16 * 1024
HANDSHAKE_TIMEOUT_S = 10.0
STREAM_JOIN_TIMEOUT_S = 1.0
LINGER_TIMEOUT_S = 2.0
SHUTDOWN_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 10_000
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_LISTENING = "LISTENING"


class HandshakeError(Exception):
    """The upgrade request is refused with ``status`` (an HTTP status code)."""

    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail
        super().__init__(f"{status}: {detail}")


class _Request:
    """The parsed request line and headers (names lowercased, repeats joined with ", ")."""

    __slots__ = ("method", "target", "headers")

    def __init__(self, method: str, target: str, headers: dict[str, str]):
        self.method, self.target, self.headers = method, target, headers

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def has_token(self, name: str, token: str) -> bool:
        return token in (t.strip().lower() for t in self.headers.get(name, "").split(","))

    @property
    def is_upgrade(self) -> bool:
        return self.has_token("upgrade", "websocket")


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()).decode("ascii")


def _read_request(sock: socket.socket) -> tuple[_Request, bytes]:
    """Read up to the blank line; return the request and the bytes that followed it."""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(data) > MAX_HANDSHAKE_BYTES:
            raise HandshakeError(431, "request head over 16 KiB")
        chunk = sock.recv(8192)
        if not chunk:
            raise ConnectionError("peer closed during the handshake")
        data += chunk
    if end > MAX_HANDSHAKE_BYTES:
        raise HandshakeError(431, "request head over 16 KiB")
    head, rest = data[:end], data[end + 4 :]
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HandshakeError(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HandshakeError(400, "malformed header line")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return _Request(parts[0], parts[1], headers), rest


def _http_response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8") -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _Connection:
    """One upgraded connection: the socket, its single-writer lock and its closed signal.

    ``closed`` is set once the CLOSE frame is sent or the connection ended; nothing is
    written after it, so a stream tick can never follow the CLOSE frame.
    """

    __slots__ = ("sock", "lock", "closed")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = gevent.lock.Semaphore()
        self.closed = gevent.event.Event()

    def send(self, data: bytes) -> None:
        with self.lock:
            if not self.closed.is_set():
                self.sock.sendall(data)

    def send_close(self, code: int) -> bool:
        """Send the CLOSE frame unless the connection is already closing; True if sent."""
        with self.lock:
            if self.closed.is_set():
                return False
            self.closed.set()
            self.sock.sendall(encode_frame(OP_CLOSE, encode_close_payload(code)))
            return True

    def linger(self) -> None:
        """After our CLOSE: stop writing and read until the peer closes too (bounded)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(LINGER_TIMEOUT_S)
            while self.sock.recv(READ_CHUNK_BYTES):
                pass
        except OSError:
            log.debug("peer did not close cleanly after our CLOSE", exc_info=True)


class EchoServer:
    """The echo backend; :meth:`handle` serves one accepted socket (one greenlet each)."""

    def __init__(
        self,
        *,
        name: str = "echo",
        subprotocols: list[str] | None = None,
        reject_status: int | None = None,
        stream_interval_ms: int | None = None,
        work_ms: int = 0,
    ):
        self.name = name
        self.subprotocols = list(subprotocols or [])
        self.reject_status = reject_status
        self.stream_interval_s = stream_interval_ms / 1000.0 if stream_interval_ms else None
        self.work_s = work_ms / 1000.0
        self.connections_total = 0
        self.messages_total = 0
        self.pings_total = 0
        self._open: set[_Connection] = set()
        self.last_headers: dict[str, str] = {}
        self.last_path = ""

    @property
    def connections_open(self) -> int:
        """Upgraded connections that are not closing yet."""
        return len(self._open)

    def stats(self) -> dict:
        return {
            "name": self.name,
            "connections_total": self.connections_total,
            "connections_open": self.connections_open,
            "messages_total": self.messages_total,
            "pings_total": self.pings_total,
            "last_headers": dict(self.last_headers),
            "last_path": self.last_path,
        }

    def handle(self, sock: socket.socket, address) -> None:
        """StreamServer handler: errors end this connection only, logged at debug level."""
        try:
            self._handle(sock)
        except (OSError, ValueError, HandshakeError, ProtocolError):  # the peer's doing: end this one only
            log.debug("connection from %s ended with an error", address, exc_info=True)
        finally:
            sock.close()

    def _handle(self, sock: socket.socket) -> None:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            request, rest = _read_request(sock)
            if not request.is_upgrade:
                sock.sendall(self._plain_http(request))
                return
            response = self._upgrade_response(request)
        except HandshakeError as exc:
            sock.sendall(_http_response(exc.status, f"{exc.detail}\n".encode()))
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(response)
        self._serve_websocket(_Connection(sock), rest)

    def _plain_http(self, request: _Request) -> bytes:
        if request.method == "GET" and request.path == "/stats":
            body = json.dumps(self.stats()).encode()
            return _http_response(200, body, "application/json")
        return _http_response(426, b"this is a WebSocket echo server; GET /stats for statistics\n")

    def _upgrade_response(self, request: _Request) -> bytes:
        """The 101 answer to a valid upgrade; raises HandshakeError to refuse it."""
        self.last_headers = dict(request.headers)
        self.last_path = request.target
        if self.reject_status is not None:
            raise HandshakeError(self.reject_status, f"{self.name} rejects every upgrade")
        if request.method != "GET" or not request.has_token("connection", "upgrade"):
            raise HandshakeError(400, "not a WebSocket upgrade")
        if request.headers.get("sec-websocket-version") != "13":
            raise HandshakeError(426, "only WebSocket version 13 is supported")
        key = request.headers.get("sec-websocket-key", "")
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError(key)
        except ValueError:
            raise HandshakeError(400, "bad Sec-WebSocket-Key") from None
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_key(key)}",
        ]
        protocol = self._choose_subprotocol(request)
        if protocol:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _choose_subprotocol(self, request: _Request) -> str | None:
        if not self.subprotocols:
            return None
        offered = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        if not offered:
            return None
        for protocol in offered:
            if protocol in self.subprotocols:
                return protocol
        raise HandshakeError(400, f"none of the offered subprotocols {offered} is supported")

    def close_all(self, code: int = 1001) -> None:
        """Send CLOSE (1001 going away by default) on every open connection."""
        for conn in list(self._open):
            self._close(conn, code)

    def _close(self, conn: _Connection, code: int) -> None:
        # Counted as closed before the CLOSE frame leaves: a client that has the frame
        # in hand sees the count already lowered in /stats.
        self._open.discard(conn)
        try:
            conn.send_close(code)
        except OSError:
            log.debug("could not send CLOSE %s", code, exc_info=True)

    def _serve_websocket(self, conn: _Connection, rest: bytes) -> None:
        self.connections_total += 1
        self._open.add(conn)
        streamer = None
        if self.stream_interval_s is not None:
            streamer = gevent.spawn(self._stream, conn)
        try:
            self._echo(conn, rest)
        finally:
            self._open.discard(conn)
            conn.closed.set()
            if streamer is not None:
                streamer.join(STREAM_JOIN_TIMEOUT_S)
                streamer.kill(block=True, timeout=STREAM_JOIN_TIMEOUT_S)

    def _echo(self, conn: _Connection, data: bytes) -> None:
        """Read, parse and answer until CLOSE, a protocol error or the end of the stream."""
        parser = FrameParser(expect_masked=True)
        recv = conn.sock.recv
        while True:
            if data:
                try:
                    events = parser.feed(data)
                except ProtocolError as exc:
                    log.debug("protocol error from client: %s", exc)
                    self._close(conn, exc.close_code)
                    conn.linger()
                    return
                out = []
                for opcode, payload in events:
                    if opcode == OP_TEXT or opcode == OP_BINARY:
                        self.messages_total += 1
                        out.append(encode_frame(opcode, payload))
                    elif opcode == OP_PING:
                        self.pings_total += 1
                        out.append(encode_frame(OP_PONG, payload))
                    elif opcode == OP_CLOSE:
                        try:
                            code, _ = parse_close_payload(payload)
                        except ProtocolError as exc:
                            code = exc.close_code
                        if out:
                            conn.send(b"".join(out))
                        self._close(conn, code or 1000)
                        conn.linger()
                        return
                if out:
                    if self.work_s:
                        gevent.sleep(self.work_s)  # ok-sleep: --work-ms simulates processing time
                    conn.send(out[0] if len(out) == 1 else b"".join(out))
            data = recv(READ_CHUNK_BYTES)
            if not data:
                return

    def _stream(self, conn: _Connection) -> None:
        """Send "1", "2", ... every interval until the connection's closed signal is set."""
        n = 0
        try:
            while not conn.closed.wait(self.stream_interval_s):
                n += 1
                conn.send(encode_frame(OP_TEXT, str(n).encode()))
        except OSError:
            log.debug("stream to a client ended", exc_info=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m iwsproxy.tools.echo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port, 0 for any free one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="echo", help="shown by GET /stats")
    parser.add_argument("--subprotocol", action="append", default=[], help="an accepted subprotocol (repeatable)")
    parser.add_argument("--reject-status", type=int, help="answer every upgrade with this HTTP status")
    parser.add_argument("--stream-interval-ms", type=int, help='also send "1", "2", ... every N ms')
    parser.add_argument("--work-ms", type=int, default=0,
                        help="simulated processing time before each batch of replies (for loss tests)")
    parser.add_argument("--certfile", help="serve wss:// with this certificate (PEM)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if args.reject_status is not None and not 200 <= args.reject_status <= 599:
        parser.error("--reject-status must be an HTTP status between 200 and 599")
    if args.stream_interval_ms is not None and args.stream_interval_ms <= 0:
        parser.error("--stream-interval-ms must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    from gevent import monkey

    monkey.patch_all()
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s {args.name} %(levelname)s %(message)s")
    echo = EchoServer(
        name=args.name,
        subprotocols=args.subprotocol,
        reject_status=args.reject_status,
        stream_interval_ms=args.stream_interval_ms,
        work_ms=args.work_ms,
    )
    pool = gevent.pool.Pool(args.max_connections)
    tls = {"certfile": args.certfile, "keyfile": args.keyfile} if args.certfile else {}
    server = gevent.server.StreamServer((args.host, args.port), echo.handle, spawn=pool, **tls)
    stopping = gevent.event.Event()
    handlers = [gevent.signal_handler(sig, stopping.set) for sig in (signal.SIGTERM, signal.SIGINT)]
    server.start()
    print(f"{_LISTENING} {server.server_port}", flush=True)
    try:
        stopping.wait()
    finally:
        # A second SIGTERM (EchoProcess.terminate() on a process already stopping) must
        # not turn a clean exit into death by signal: ignore both from here on.
        for handler in handlers:
            handler.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        # Stop in layers: no new connections, CLOSE 1001 to the open ones, then a bounded
        # wait for their close handshakes, then kill what is left.
        server.close()
        with gevent.Timeout(SHUTDOWN_TIMEOUT_S, False):
            echo.close_all(1001)
        server.stop(timeout=SHUTDOWN_TIMEOUT_S)
    return 0


class EchoProcess(ChildProcess):
    """``python -m iwsproxy.tools.echo --port 0 ...`` as a child process (see :class:`ChildProcess`)."""

    def __init__(self, *args: str, name: str = "echo"):
        super().__init__("iwsproxy.tools.echo", "--port", "0", "--name", name, *args, name=name)

    def stats(self) -> dict:
        return self.get_json("/stats")


if __name__ == "__main__":
    sys.exit(main())
