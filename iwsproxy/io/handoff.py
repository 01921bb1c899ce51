"""Handing a client's connection to the process that holds its session (same host).

gunicorn's workers share one listening socket, so a client that reconnects
lands on any of them, while its session lives in one. With a handoff
directory (``--handoff-dir``), every process that serves pipes listens on a
Unix socket there, ``<pid>.sock``. A process that gets an upgrade for a client
id it does not know asks the others whether they hold it; the one that does
is sent the client's socket itself (``SCM_RIGHTS``) together with the request
as it was read, before anything was answered. It then serves that request as
if it had accepted it: resume, takeover and every refusal work as they do in
one process.

Wire format on the Unix socket, one exchange per connection: a 4-byte length,
a JSON header, then (for a handoff) the request bytes; the descriptor rides on
the first message. ``{"op": "has", "id": ...}`` is answered with one byte,
``1`` or ``0``; ``{"op": "take", "address": [host, port], "size": n}`` is not
answered (the socket is the receiver's from then on). ``{"op": "takeover"}`` from a worker
that stops turns the connection into a channel that moves its pipes here (see
:mod:`iwsproxy.io.handover`; refused, by closing, by a process that is stopping itself).

A process publishes its socket under that name only once it listens, so a
name whose connection is refused was left by a process that died without
removing it (SIGKILL, say): the first peer to find it removes it.

The directory must be private to the proxy's user: whoever can connect to
these sockets can hand connections to the proxy and ask which ids it holds.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import socket
import struct

import gevent
from gevent.pool import Group
from gevent.server import StreamServer

__all__ = ["Handoff", "prefixed_reader"]

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
ASK_TIMEOUT_S = 0.5        # a peer that does not answer "do you hold this id?" within this is skipped
MAX_HEADER_BYTES = 4096
MAX_REQUEST_BYTES = 1024 * 1024  # the request head plus what the client sent right after it


class _PrefixedReader(io.RawIOBase):
    """Raw reads that return ``prefix`` first, then read the socket: the HTTP reader of a handed-in
    request sees the request exactly as the first process read it."""

    def __init__(self, prefix: bytes, sock: socket.socket):
        self._prefix = memoryview(prefix)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        try:
            return self._sock.recv_into(buffer)
        except BlockingIOError:
            return None


class Handoff:
    """This process's end of the handoff directory: a listener, and the questions and handoffs
    it sends to the other processes."""

    def __init__(self, directory: str, holds, serve_request, take_over=None):
        """``holds(client_id) -> bool`` answers peers; ``serve_request(sock, address, request)``
        serves a handed-in connection (in its own greenlet); ``take_over(sock)``, if given, takes
        the pipes of a peer that stops (``{"op": "takeover"}``: the socket becomes a channel of
        :mod:`iwsproxy.io.handover`, and ``take_over`` owns it)."""
        self._take_over = take_over
        self.directory = directory
        self.path: str | None = None  # ours, named when we start listening (after any fork)
        self._holds = holds
        self._serve_request = serve_request
        self._server: StreamServer | None = None

    # ---- listening ----
    def start(self) -> None:
        if self._server is not None:
            return
        self.path = os.path.join(self.directory, f"{os.getpid()}.sock")
        binding = self.path + ".new"
        _remove(binding)  # left by an earlier process with our pid
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            listener.bind(binding)
        finally:
            os.umask(old_umask)
        listener.listen(128)
        # a "<pid>.sock" name is only ever seen listening, so a peer may take a refused one for stale
        os.replace(binding, self.path)
        self._server = StreamServer(listener, self._handle)
        self._server.start()
        log.info("handoff: listening on %s", self.path)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout=1)
            _remove(self.path)

    def _handle(self, conn: socket.socket, _address) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(ASK_TIMEOUT_S)
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_HEADER_BYTES + _LENGTH.size, 1)
            header, rest = _split_header(data)
            if header.get("op") == "takeover" and self._take_over is not None and not rest:
                conn.settimeout(None)
                self._take_over(conn)
            elif header.get("op") == "has":
                conn.sendall(b"1" if self._holds(str(header.get("id", ""))) else b"0")
            elif header.get("op") == "take" and len(fds) == 1:
                size = int(header["size"])
                if not 0 <= size <= MAX_REQUEST_BYTES:
                    raise ValueError("request too large")
                request = bytearray(rest)
                while len(request) < size:
                    chunk = conn.recv(size - len(request))
                    if not chunk:
                        raise ValueError("handoff cut short")
                    request += chunk
                host, port = header.get("address") or ("", 0)
                address = (str(host), int(port))
                client = socket.socket(fileno=fds.pop())
                try:
                    self._serve_request(client, address, bytes(request))
                except BaseException:
                    client.close()
                    raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("handoff: bad message from a peer: %s", exc)
        finally:
            for fd in fds:  # descriptors nobody took
                os.close(fd)
            conn.close()

    # ---- asking the others ----
    def _peers(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            log.warning("handoff: cannot list %s: %s", self.directory, exc)
            return []
        return [os.path.join(self.directory, n) for n in names
                if n.endswith(".sock") and os.path.join(self.directory, n) != self.path]

    def find_holder(self, client_id: str) -> str | None:
        """The socket path of the process that holds ``client_id``'s session, if another one does."""
        peers = self._peers()
        if not peers:
            return None
        group = Group()
        asks = {group.spawn(_ask, path, client_id): path for path in peers}
        try:
            for ask in gevent.iwait(list(asks), timeout=ASK_TIMEOUT_S * 2):
                if ask.successful() and ask.value:
                    return asks[ask]
            return None
        finally:
            group.kill(block=False)

    @staticmethod
    def hand_over(path: str, sock: socket.socket, address, request: bytes) -> bool:
        """Send ``sock`` and the ``request`` it carried to the process at ``path``; False if it
        could not be reached or the request is too large for it (the caller serves it itself)."""
        if len(request) > MAX_REQUEST_BYTES:
            return False
        host_port = list(address[:2]) if isinstance(address, (tuple, list)) else ["", 0]
        header = json.dumps({"op": "take", "address": host_port, "size": len(request)}).encode()
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            peer.settimeout(ASK_TIMEOUT_S)
            peer.connect(path)
            socket.send_fds(peer, [_LENGTH.pack(len(header)) + header], [sock.fileno()])
            peer.sendall(request)
            return True
        except OSError as exc:
            log.warning("handoff: could not hand a connection to %s: %s", path, exc)
            return False
        finally:
            peer.close()


def _split_header(data: bytes) -> tuple[dict, bytes]:
    if len(data) < _LENGTH.size:
        raise ValueError("message too short")
    (length,) = _LENGTH.unpack_from(data)
    if length > MAX_HEADER_BYTES or len(data) < _LENGTH.size + length:
        raise ValueError("bad header length")
    header = json.loads(data[_LENGTH.size : _LENGTH.size + length])
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    return header, data[_LENGTH.size + length :]


def _ask(path: str, client_id: str) -> bool:
    """Does the process listening at ``path`` hold ``client_id``? (False if it cannot say.)"""
    header = json.dumps({"op": "has", "id": client_id}).encode()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer.settimeout(ASK_TIMEOUT_S)
        peer.connect(path)
        peer.sendall(_LENGTH.pack(len(header)) + header)
        return peer.recv(1) == b"1"
    except ConnectionRefusedError:
        # nobody listens there: its process died without removing it (SIGKILL, say)
        log.info("handoff: removing %s, left by a process that is gone", path)
        _remove(path)
        return False
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # removed by its process as it stopped: skip it quietly
            log.warning("handoff: no answer from %s: %s", path, exc)
        return False
    finally:
        peer.close()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def prefixed_reader(prefix: bytes, sock: socket.socket) -> io.BufferedReader:
    return io.BufferedReader(_PrefixedReader(prefix, sock))

