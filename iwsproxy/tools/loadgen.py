"""The benchmark's load generator: worker processes driving raw WebSocket clients.

Each worker is a separate process (``multiprocessing``, spawn context) that runs
its share of the connections in one ``selectors`` loop over non-blocking
sockets. No gevent, no websocket-client: the handshake is a few lines of
HTTP written here, frames are encoded and parsed by :mod:`iwsproxy.frames`
(masked client frames, unmasked server frames), and every frame a phase sends
is encoded with its own mask key before the clock starts, so the timed loop
does little more than ``recv``, ``FrameParser.feed`` and ``send``.

A phase (:class:`Phase`) runs in lockstep with the parent, on one cyclic
``Barrier`` shared by the workers and the parent::

    worker: connect -> [ready] ------------> [go] -> work -> result -> [release] -> close
    parent:  send   -> [ready] -> measure -> [go] -> collect results -> measure -> [release]

so the parent reads the proxy's CPU time or RSS while every connection is open
and no traffic flows. The timed part of a phase ends at a deadline read from
``time.perf_counter()``; nothing here sleeps to synchronise.

Kinds of phase:

``window``
    every connection keeps ``window`` messages in flight: it sends ``window``
    messages, then one more per echo, until the deadline; echoes received by
    then are counted and their round-trip times sampled, echoes still in
    flight are drained afterwards (counted in ``total_echoes`` only).
``pingpong``
    one message at a time, ``count`` times, on each connection (blocking I/O).
``idle``
    each connection exchanges one message (so its pipe is fully set up),
    then stays idle until released.

Every ping from the server is answered with a pong: the proxy keeps what it sent a
client until the pong for its ping fence comes back, and closes a client that never
answers (1013, buffer limit) once that passes the buffer limit.
"""

from __future__ import annotations

import base64
import hashlib
import os
import selectors
import signal
import socket
import time
import traceback
from array import array
from collections import deque
from dataclasses import dataclass, field
from threading import BrokenBarrierError

from iwsproxy.exceptions import ProtocolError
from iwsproxy.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameParser,
    MaskSource,
    encode_close_payload,
    encode_frame,
)

__all__ = ["Target", "Phase", "PhaseResult", "HandshakeFailed", "open_websocket", "worker_main"]

READ_CHUNK_BYTES = 256 * 1024
MAX_HEAD_BYTES = 16 * 1024


def _timeout_scale() -> float:
    raw = os.environ.get("IWSPROXY_BENCH_TIMEOUT_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = 0.0
    if not scale > 0:
        raise ValueError(f"IWSPROXY_BENCH_TIMEOUT_SCALE must be a number above 0, not {raw!r}")
    return scale


# Every timeout of the benchmark is multiplied by IWSPROXY_BENCH_TIMEOUT_SCALE (default 1), for a
# slow or emulated machine; the load generator's worker processes inherit it.
TIMEOUT_SCALE = _timeout_scale()
CONNECT_TIMEOUT_S = 10.0 * TIMEOUT_SCALE
BARRIER_TIMEOUT_S = 180.0 * TIMEOUT_SCALE
DRAIN_TIMEOUT_S = 10.0 * TIMEOUT_SCALE
CLOSE_TIMEOUT_S = 5.0 * TIMEOUT_SCALE
PINGPONG_TIMEOUT_S = 10.0 * TIMEOUT_SCALE  # per round trip
MAX_RTT_SAMPLES = 100_000  # per worker and phase; more are thinned evenly
FRAME_POOL_BYTES = 8 * 1024 * 1024  # pre-encoded frames per phase, at most this many bytes...
FRAME_POOL_MAX = 512  # ...and at most this many frames
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True)
class Target:
    """Where one connection goes: ``ws://host:port/path``."""

    host: str
    port: int
    path: str


@dataclass(frozen=True)
class Phase:
    """One worker's part of one benchmark phase (see the module docstring for ``kind``)."""

    kind: str
    targets: tuple[Target, ...]
    payload_bytes: int = 100
    window: int = 1
    duration_s: float = 0.0
    count: int = 0


@dataclass
class PhaseResult:
    worker: int
    connections: int = 0
    echoes: int = 0  # echoes received before the deadline (pingpong: all of them)
    echoed_bytes: int = 0  # their payload bytes
    total_echoes: int = 0  # including those drained after the deadline
    elapsed_s: float = 0.0  # length of the timed part
    cpu_s: float = 0.0  # this worker's user+sys CPU time during the timed part
    rtt_s: array = field(default_factory=lambda: array("d"))
    error: str | None = None


class HandshakeFailed(Exception):
    """The server did not answer the upgrade with a valid 101."""


def _accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


def open_websocket(target: Target, timeout_s: float = CONNECT_TIMEOUT_S) -> tuple[socket.socket, bytes]:
    """Connect and upgrade; return the blocking socket and any bytes read past the 101 head."""
    sock = socket.create_connection((target.host, target.port), timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (target.path.encode("ascii"), target.host.encode("ascii"), target.port, key)
        )
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > MAX_HEAD_BYTES:
                raise HandshakeFailed(f"{target}: response head over {MAX_HEAD_BYTES} bytes")
            chunk = sock.recv(8192)
            if not chunk:
                raise HandshakeFailed(f"{target}: closed during the handshake: {data[:200]!r}")
            data += chunk
        head, rest = data[:end], data[end + 4 :]
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101"):
            raise HandshakeFailed(f"{target}: answered {lines[0].decode('latin-1')!r}: {rest[:200]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"sec-websocket-accept") != _accept_key(key):
            raise HandshakeFailed(f"{target}: wrong Sec-WebSocket-Accept")
        return sock, rest
    except BaseException:
        sock.close()
        raise


class _Client:
    """One connection of a worker: its socket, parser, send times and unsent bytes."""

    __slots__ = ("sock", "parser", "sent_at", "backlog", "closed")

    def __init__(self, sock: socket.socket, leftover: bytes, payload_bytes: int):
        self.sock = sock
        self.parser = FrameParser(expect_masked=False, max_message_size=max(payload_bytes, 125) + 1024)
        self.sent_at: deque[float] = deque()
        self.backlog: memoryview | None = None  # bytes a non-blocking send could not take yet
        self.closed = False
        if leftover:
            self.parser.feed(leftover)  # nothing is expected before the first message; dropped

    def send(self, data: bytes, selector: selectors.BaseSelector) -> None:
        """Send now as far as the socket takes it; keep the rest for EVENT_WRITE."""
        if self.backlog is not None:
            self.backlog = memoryview(bytes(self.backlog) + data)
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.backlog = memoryview(data)[sent:]
            selector.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)

    def receive(self) -> list:
        """The events of one non-blocking read ([] if nothing was ready); ConnectionError at EOF."""
        try:
            data = self.sock.recv(READ_CHUNK_BYTES)
        except BlockingIOError:
            return []
        if not data:
            raise ConnectionError("server closed the connection without a close frame")
        return self.parser.feed(data)

    def flush(self, selector: selectors.BaseSelector) -> None:
        backlog = self.backlog
        if backlog is None:
            return
        try:
            sent = self.sock.send(backlog)
        except BlockingIOError:
            return
        if sent < len(backlog):
            self.backlog = backlog[sent:]
        else:
            self.backlog = None
            selector.modify(self.sock, selectors.EVENT_READ, self)


class _FramePool:
    """Frames of one payload, each masked with its own key, handed out round robin."""

    def __init__(self, payload_bytes: int, wanted: int):
        size = max(1, min(wanted, FRAME_POOL_MAX, FRAME_POOL_BYTES // max(payload_bytes, 1)))
        payload = os.urandom(payload_bytes)
        masks = MaskSource()
        self.frames = [encode_frame(OP_BINARY, payload, mask_source=masks) for _ in range(size)]
        self.joined = b"".join(self.frames * 2)  # any run of consecutive frames is one slice
        self.frame_bytes = len(self.frames[0])
        self.size = size
        self.next = 0

    def take(self, n: int) -> bytes:
        """``n`` consecutive frames as one bytes object."""
        if n > self.size:
            return b"".join(self.take(min(self.size, n - i)) for i in range(0, n, self.size))
        start = self.next
        self.next = (start + n) % self.size
        fb = self.frame_bytes
        return self.joined[start * fb : (start + n) * fb]


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _connect_all(phase: Phase) -> list[_Client]:
    clients = []
    try:
        for target in phase.targets:
            sock, leftover = open_websocket(target)
            clients.append(_Client(sock, leftover, phase.payload_bytes))
    except BaseException:
        _abort_all(clients)
        raise
    return clients


def _abort_all(clients: list[_Client]) -> None:
    for client in clients:
        client.sock.close()


def _read_events(events: list, payload_bytes: int, masks: MaskSource) -> tuple[int, bytes]:
    """``(echoes, pong frames to send)`` for ``events``; raises on anything but echoes of the
    right size, pings and pongs.

    Pings are answered: the proxy sends its clients ping fences and keeps what it sent
    until the pong comes back, so a client that ignored them would be closed with 1013.
    """
    n = 0
    pongs = b""
    for opcode, payload in events:
        if opcode == OP_BINARY and len(payload) == payload_bytes:
            n += 1
        elif opcode == OP_PING:
            pongs += encode_frame(OP_PONG, payload, mask_source=masks)
        elif opcode == OP_CLOSE:
            raise ConnectionError(f"server closed the connection: {payload[:2].hex()} {payload[2:]!r}")
        elif opcode != OP_PONG:
            raise ConnectionError(f"unexpected frame: opcode {opcode}, {len(payload)} bytes")
    return n, pongs


def _frames_for(phase: Phase, connections: int) -> _FramePool | None:
    """The phase's frames, encoded before its clock starts."""
    if phase.kind == "window":
        return _FramePool(phase.payload_bytes, phase.window * max(1, connections) * 4)
    if phase.kind == "pingpong":
        return _FramePool(phase.payload_bytes, phase.count)
    return None


def _run_window(clients: list[_Client], phase: Phase, result: PhaseResult, start: float,
                pool: _FramePool) -> None:
    """Keep ``phase.window`` messages in flight on every connection until the deadline, then drain."""
    size = phase.payload_bytes
    masks = MaskSource()
    rtts = result.rtt_s
    perf_counter = time.perf_counter
    deadline = start + phase.duration_s
    echoes = total = 0
    in_flight = 0
    with selectors.DefaultSelector() as selector:
        for client in clients:
            client.sock.setblocking(False)
            selector.register(client.sock, selectors.EVENT_READ, client)
        now = perf_counter()
        for client in clients:
            client.sent_at.extend([now] * phase.window)
            client.send(pool.take(phase.window), selector)
            in_flight += phase.window
        sending = True
        drain_deadline = deadline + DRAIN_TIMEOUT_S
        while in_flight:
            now = perf_counter()
            if sending and now >= deadline:
                sending = False
            if not sending and now >= drain_deadline:
                raise TimeoutError(f"{in_flight} echoes still missing {DRAIN_TIMEOUT_S} s after the deadline")
            for key, mask in selector.select((deadline if sending else drain_deadline) - now):
                client = key.data
                if mask & selectors.EVENT_WRITE:
                    client.flush(selector)
                if not mask & selectors.EVENT_READ:
                    continue
                events = client.receive()
                if not events:
                    continue
                t = perf_counter()
                n, pongs = _read_events(events, size, masks)
                sent_at = client.sent_at
                in_flight -= n
                total += n
                if t <= deadline:
                    echoes += n
                    for _ in range(n):
                        rtts.append(t - sent_at.popleft())
                else:
                    for _ in range(n):
                        sent_at.popleft()
                if n and t <= deadline:
                    sent_at.extend([t] * n)
                    client.send(pongs + pool.take(n), selector)
                    in_flight += n
                elif pongs:
                    client.send(pongs, selector)
        for client in clients:
            client.sock.setblocking(True)
    result.echoes = echoes
    result.echoed_bytes = echoes * size
    result.total_echoes = total
    result.elapsed_s = phase.duration_s


def _run_pingpong(clients: list[_Client], phase: Phase, result: PhaseResult, pool: _FramePool) -> None:
    """One message at a time, ``phase.count`` round trips per connection, timed one by one."""
    size = phase.payload_bytes
    masks = MaskSource()
    rtts = result.rtt_s
    perf_counter = time.perf_counter
    for client in clients:
        sock, parser = client.sock, client.parser
        sock.settimeout(PINGPONG_TIMEOUT_S)
        for _ in range(phase.count):
            frame = pool.take(1)
            t0 = perf_counter()
            sock.sendall(frame)
            n = 0
            while not n:
                data = sock.recv(READ_CHUNK_BYTES)
                arrived = perf_counter()  # the round trip ends as the echo arrives, before any pong is made
                if not data:
                    raise ConnectionError("server closed the connection without a close frame")
                n, pongs = _read_events(parser.feed(data), size, masks)
                if pongs:
                    sock.sendall(pongs)
            rtts.append(arrived - t0)
            result.echoes += n
    result.echoed_bytes = result.echoes * size
    result.total_echoes = result.echoes


def _exchange_one(clients: list[_Client], phase: Phase) -> None:
    """One echo on every connection (all in flight at once): each pipe is fully set up."""
    if not clients:
        return
    masks = MaskSource()
    frame = encode_frame(OP_BINARY, os.urandom(phase.payload_bytes), mask_source=masks)
    waiting = set()
    with selectors.DefaultSelector() as selector:
        for client in clients:
            client.sock.sendall(frame)
            client.sock.setblocking(False)
            selector.register(client.sock, selectors.EVENT_READ, client)
            waiting.add(client)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(waiting)} idle connections did not echo their first message")
            for key, _ in selector.select(remaining):
                client = key.data
                n, pongs = _read_events(client.receive(), phase.payload_bytes, masks)
                if pongs:
                    client.sock.sendall(pongs)  # non-blocking, but a few bytes always fit
                if n:
                    waiting.discard(client)
                    selector.unregister(client.sock)
        for client in clients:
            client.sock.setblocking(True)


def _close_all(clients: list[_Client]) -> None:
    """Close handshake on every connection (bounded), then close the sockets (whatever happens)."""
    try:
        _close_handshakes(clients)
    finally:
        _abort_all(clients)


def _close_handshakes(clients: list[_Client]) -> None:
    masks = MaskSource()
    with selectors.DefaultSelector() as selector:
        for client in clients:
            try:
                client.sock.settimeout(CLOSE_TIMEOUT_S)
                client.sock.sendall(encode_frame(OP_CLOSE, encode_close_payload(1000), mask_source=masks))
                client.sock.setblocking(False)
                selector.register(client.sock, selectors.EVENT_READ, client)
            except OSError:
                client.sock.close()
                client.closed = True
        open_clients = {c for c in clients if not c.closed}
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while open_clients:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in selector.select(remaining):
                client = key.data
                try:
                    data = client.sock.recv(READ_CHUNK_BYTES)
                    done = not data or any(op == OP_CLOSE for op, _ in client.parser.feed(data))
                except BlockingIOError:
                    continue
                except (OSError, ValueError, ProtocolError):
                    done = True  # a reset or a garbled close: the connection is over either way
                if done:
                    selector.unregister(client.sock)
                    open_clients.discard(client)


def _run_phase(index: int, phase: Phase, clients: list[_Client], barrier) -> PhaseResult:
    result = PhaseResult(worker=index, connections=len(clients))
    if phase.kind == "idle":
        _exchange_one(clients, phase)
    pool = _frames_for(phase, len(clients))
    barrier.wait(BARRIER_TIMEOUT_S)  # ready: everything connected, the parent measures
    barrier.wait(BARRIER_TIMEOUT_S)  # go
    cpu0 = _cpu_s()
    start = time.perf_counter()
    if phase.kind == "window":
        if clients:
            _run_window(clients, phase, result, start, pool)
    elif phase.kind == "pingpong":
        _run_pingpong(clients, phase, result, pool)
        result.elapsed_s = time.perf_counter() - start
    elif phase.kind != "idle":
        raise ValueError(f"unknown phase kind {phase.kind!r}")
    result.cpu_s = _cpu_s() - cpu0
    if len(result.rtt_s) > MAX_RTT_SAMPLES:
        step = len(result.rtt_s) / MAX_RTT_SAMPLES
        result.rtt_s = array("d", (result.rtt_s[int(i * step)] for i in range(MAX_RTT_SAMPLES)))
    return result


def worker_main(index: int, commands, results, barrier) -> None:
    """A worker process: run phases from ``commands`` until ``None``; results go to ``results``.

    Every phase ends with its connections closed (close handshake, bounded), after the
    release barrier when it succeeded, at once when anything failed. Ctrl-C is left to the
    parent, which stops the workers itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        phase = commands.get()
        if phase is None:
            return
        clients: list[_Client] = []
        try:
            clients = _connect_all(phase)
            results.put(_run_phase(index, phase, clients, barrier))
            barrier.wait(BARRIER_TIMEOUT_S)  # release: the parent has measured
        except BrokenBarrierError:
            results.put(PhaseResult(worker=index, error="aborted: another party failed"))
        except BaseException:  # report anything (this is a worker process) so the parent is not left waiting
            barrier.abort()
            results.put(PhaseResult(worker=index, error=traceback.format_exc()))
        finally:
            _close_all(clients)
