"""Raw-socket WebSocket peers for tests: a client that sends exactly the bytes it is told to, and
backends that do exactly what a test makes them do."""

from __future__ import annotations

import base64
import hashlib
import os
import queue
import socket
import struct
import threading
import uuid

from iwsproxy.frames import OP_CLOSE, OP_PING, FrameParser, apply_mask


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
          length: int | None = None) -> bytes:
    """One frame, any field set by hand (``length`` may lie about the payload)."""
    length = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if mask:
        key = os.urandom(4)
        return head + key + apply_mask(payload, key)
    return head + payload


class RawClient:
    def __init__(self, port: int, path: str | None = None, *, headers: dict | None = None, timeout: float = 10,
                 rcvbuf: int | None = None):
        self.sock = socket.socket()
        if rcvbuf is not None:  # set before connecting, it turns the receive buffer's autotuning off
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.path = path or "/" + str(uuid.uuid4())
        self.headers = headers or {}
        self.parser = FrameParser(expect_masked=False, max_message_size=1 << 30)
        self.rest = b""

    def request(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def upgrade_request(self, **extra: str) -> bytes:
        """A valid upgrade request (plus ``extra`` headers, None drops one), up to its blank line.

        The path and values are sent as latin-1: ``"\\xff"`` goes on the wire as the byte 0xff."""
        key = base64.b64encode(os.urandom(16)).decode()
        headers = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade",
                   "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13", **self.headers, **extra}
        lines = [f"GET {self.path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items() if v is not None]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def handshake(self, **extra: str) -> int:
        """Send a valid upgrade (plus ``extra`` headers); return the HTTP status."""
        self.sock.sendall(self.upgrade_request(**extra))
        return self.read_status()

    def read_status(self) -> int:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed during the handshake after {data!r}")
            data += chunk
        head, _, self.rest = data.partition(b"\r\n\r\n")
        return int(head.split()[1])

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def events(self) -> list[tuple[int, bytes]]:
        """Block until at least one frame arrives; [] at EOF."""
        while True:
            data, self.rest = (self.rest, b"") if self.rest else (self.sock.recv(65536), b"")
            if not data:
                return []
            events = self.parser.feed(data)
            if events:
                return events

    def data_events(self) -> list[tuple[int, bytes]]:
        """Block until data frames arrive (the proxy's pings, its fences, may come first; they are
        skipped); [] at EOF."""
        while events := self.events():
            data = [event for event in events if event[0] != OP_PING]
            if data:
                return data
        return []

    def close_code(self) -> int | None:
        """Read until the Close frame (skipping data and pings); its code, or None at EOF."""
        while True:
            events = self.events()
            if not events:
                return None
            for opcode, payload in events:
                if opcode == OP_CLOSE:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


class FakeBackend:
    """A listening socket on 127.0.0.1 that serves each connection with ``_serve`` (in a thread)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"ws://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            self._serve(conn)

    def _serve(self, conn):
        """Accept TCP and never answer: a backend stuck before its handshake."""

    def _handshake(self, conn) -> bytes:
        """Answer the proxy's upgrade with 101; return its request as received."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                raise ConnectionError("the proxy left during the handshake")
            data += chunk
        key = next(line.split(b":", 1)[1].strip() for line in data.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        return data

    def close(self):
        """Stop listening and drop the connections accepted: the proxy reads EOF at once (it
        would otherwise wait out its close grace for Close replies that never come)."""
        self.sock.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already


class RecordingBackend(FakeBackend):
    """Completes each handshake and puts the proxy's request, bytes as received, on ``requests``
    (then says nothing): what a backend sees of a client's headers and query."""

    def __init__(self):
        self.requests: queue.Queue[bytes] = queue.Queue()
        super().__init__()

    def _serve(self, conn):
        self.requests.put(self._handshake(conn))


class DeafBackend(FakeBackend):
    """Completes the handshake, then never reads again: no echo, no pong, no Close reply; what
    the proxy writes to it stays unacknowledged."""

    def _serve(self, conn):
        self._handshake(conn)
