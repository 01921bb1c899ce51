"""A peer that stops reading: its connection is dropped after --pong-timeout without progress,
and the pipe goes on (failover for a backend; detach or end for a client), never frozen."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter

import gevent
from gevent import socket as gsocket

from conftest import stats, wait_for
from inprocess import make_pipe
from rawws import frame

from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_PING, FrameParser
from iwsproxy.io.connection import Connection, ConnectionLost
from iwsproxy.io.events import BackendLost
from iwsproxy.io.pipe import PersistentPipe
from iwsproxy.session import CloseClient, SendToBackend, SendToClient, encode_fence

CHUNK = 256 * 1024
COUNT = 64   # 16 MiB: far more than the socket buffers of a peer that does not read


def _payload(i: int) -> bytes:
    return i.to_bytes(4, "big") * (CHUNK // 4)


def _status(proxy) -> dict:
    return proxy.admin("GET", path="/admin/status")[1]


def test_a_frozen_backend_is_failed_over_with_nothing_lost(processes):
    frozen = processes.echo(name="frozen")
    good = processes.echo(name="good")
    # resume off: no pings to the client, whose websocket-client could not answer one (and so
    # would stop reading) while its sending thread waits for the proxy to read
    proxy = processes.proxy("--backend", frozen.url, "--pong-timeout", "1", "--buffer-limit", "64MiB",
                            "--resume-grace", "0")
    ws = proxy.connect(timeout=30)
    ws.send_binary(b"warm-up")
    assert ws.recv() == b"warm-up"
    proxy.admin("POST", {"url": good.url})
    os.kill(frozen.proc.pid, signal.SIGSTOP)  # alive, connected, reading nothing
    try:
        sent = threading.Event()

        def send_all():
            for i in range(COUNT):
                ws.send_binary(_payload(i))
            sent.set()

        threading.Thread(target=send_all, daemon=True).start()
        # the proxy's writes to the frozen backend block; after --pong-timeout without progress it
        # drops that connection, and everything unacknowledged goes to the good backend, in order
        echoes = [ws.recv() for _ in range(COUNT)]
        assert sent.wait(10)
        assert [e[:4] for e in echoes] == [i.to_bytes(4, "big") for i in range(COUNT)]
        assert echoes == [_payload(i) for i in range(COUNT)]
        pipe = proxy.pipes()[0]
        assert (pipe["backend"], pipe["failovers"]) == (good.url, 1)
        assert _status(proxy)["counters"].get("backends_dropped_stuck") == 1
        ws.close()
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)


def _stuck_client(port: int, client_id: str) -> socket.socket:
    """A WebSocket client that never reads, with a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall((f"GET /{client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # only the response head: the frames after it stay unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _flood(sock: socket.socket) -> threading.Thread:
    """Send COUNT messages from a thread (its writes block once the proxy stops reading them)."""
    def run():
        try:
            for i in range(COUNT):
                sock.sendall(frame(OP_BINARY, _payload(i)))
        except OSError:
            pass  # the proxy dropped the connection
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_client_that_stops_reading_is_dropped_and_the_proxy_serves_on(processes):
    echo = processes.echo()
    proxy = processes.proxy("--backend", echo.url, "--pong-timeout", "1", "--resume-grace", "0",
                            "--buffer-limit", "64MiB")
    other = proxy.connect()
    stuck = _stuck_client(proxy.port, str(uuid.uuid4()))
    try:
        flood = _flood(stuck)
        # the echoes fill the stuck client's buffers; the pipe's writes to it block, and after
        # --pong-timeout without progress the proxy drops it: the session ends (resume is off)
        wait_for(lambda: _status(proxy)["counters"].get("clients_dropped_stuck") == 1, timeout=30,
                 what="the stuck client to be dropped")
        wait_for(lambda: len(proxy.pipes()) == 1, timeout=10, what="the stuck client's pipe to end")
        flood.join(10)
        assert not flood.is_alive()
        for i in range(20):  # everyone else was served throughout
            other.send(f"m{i}")
            assert other.recv() == f"m{i}"
        other.close()
    finally:
        stuck.close()


def test_a_stuck_connection_is_taken_over_and_the_new_one_gets_everything(processes):
    echo = processes.echo()
    proxy = processes.proxy("--backend", echo.url, "--pong-timeout", "30", "--buffer-limit", "64MiB")
    client_id = str(uuid.uuid4())
    stuck = _stuck_client(proxy.port, client_id)
    try:
        flood = _flood(stuck)
        # wait until the echoes have filled the stuck connection (its pipe holds them unacknowledged)
        wait_for(lambda: proxy.pipes()[0]["buffered_to_client_bytes"] > 8 * CHUNK, timeout=30,
                 what="echoes to pile up towards the stuck connection")
        # a new connection with the same id takes the session over long before --pong-timeout. What
        # the old connection sent and the proxy had not read yet is gone with it (TCP accepted it,
        # nobody read it); the echo of everything the backend got comes to the new connection
        fresh = proxy.connect(client_id, timeout=30)
        flood.join(30)
        assert not flood.is_alive()
        fresh.send("end")
        echoes = []
        while (echo_of := fresh.recv()) != "end":
            echoes.append(echo_of)
        assert len(echoes) > 8
        assert echoes == [_payload(i) for i in range(len(echoes))]  # from the first, in order, each once
        assert stats(echo)["messages_total"] == len(echoes) + 1
        assert _status(proxy)["counters"].get("clients_dropped_stuck") is None  # no wait for --pong-timeout
        fresh.close()
    finally:
        stuck.close()


# The rule itself, in this process over a real loopback pair: a write that makes progress is
# waited for however long it takes; one that makes none for --pong-timeout loses its connection.

def _small_buffered_pair():
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    peer = gsocket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # no autotuning: writes block soon
    peer.connect(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    return Connection(ours, server_side=False, max_message_size=1 << 20), peer


def _pipe_with_backend(conn: Connection, pong_timeout_s: float) -> PersistentPipe:
    """An in-process pipe holding ``conn`` as its backend connection (no greenlets running)."""
    pipe = make_pipe(pong_timeout_s=pong_timeout_s)
    pipe.backend = conn
    return pipe


def _write_under_lock(pipe: PersistentPipe, data: bytes, outcome: dict) -> gevent.Greenlet:
    def write():
        with pipe._locks.backend:
            try:
                pipe.backend.send_raw(data)
                outcome["written"] = True
            except ConnectionLost:
                outcome["written"] = False
    writer = gevent.spawn(write)
    gevent.idle()  # the writer takes the lock and blocks in its write
    assert pipe._locks.backend.locked()
    return writer


def test_a_slow_peer_that_takes_our_bytes_is_waited_for():
    conn, peer = _small_buffered_pair()
    try:
        pipe = _pipe_with_backend(conn, pong_timeout_s=0.2)
        data = bytes(1024 * 1024)
        outcome: dict = {}
        writer = _write_under_lock(pipe, data, outcome)

        def slow_reader():
            got = 0
            while got < len(data):
                got += len(peer.recv(16384))
                gevent.sleep(0.01)  # ok-sleep: the pace of a slow peer (about 1.6 MB/s: 0.6 s), not a synchronisation
            return got

        reader = gevent.spawn(slow_reader)
        with pipe._holding(backend=True):  # waits well past 0.2 s, through the whole slow write
            assert outcome == {"written": True}
        assert reader.get(timeout=10) == len(data)
        assert not conn.closed and pipe.telemetry.counters == Counter()
        writer.join(1)
    finally:
        conn.abort()
        peer.close()


def test_a_peer_that_takes_nothing_loses_its_connection_after_the_timeout():
    conn, peer = _small_buffered_pair()
    try:
        pipe = _pipe_with_backend(conn, pong_timeout_s=0.2)
        outcome: dict = {}
        writer = _write_under_lock(pipe, bytes(512 * 1024), outcome)  # the peer never reads
        with gevent.Timeout(5), pipe._holding(backend=True):
            assert outcome == {"written": False} and conn.closed
        assert pipe.telemetry.counters == Counter(backends_dropped_stuck=1)
        writer.join(1)
    finally:
        conn.abort()
        peer.close()


def _fill(conn: Connection) -> None:
    """Write until our send buffer and the peer's receive buffer are full (the peer reads nothing)."""
    sock = conn.sock
    sock.setblocking(False)
    try:
        while True:
            for size in (65536, 4096, 1):  # until not even a byte fits
                try:
                    while True:
                        sock.send(bytes(size))
                except BlockingIOError:
                    pass
            try:  # the kernel may still be moving bytes into the peer's buffer, making room
                gsocket.wait_write(sock.fileno(), timeout=0.2, timeout_exc=TimeoutError)
            except TimeoutError:
                try:
                    sock.send(b"\0")
                except BlockingIOError:
                    return
    finally:
        sock.setblocking(True)


def test_a_small_write_that_waits_for_the_peer_is_noted_as_a_stall():
    # the evidence that a reader may have been held up by this peer (see test_held_up.py)
    conn, peer = _small_buffered_pair()
    try:
        _fill(conn)
        before = time.monotonic()
        writer = gevent.spawn(conn.send_raw, bytes(100))  # fits once the peer reads a little
        gevent.idle()
        assert conn.writing and conn.stalled_at < before
        drained = gevent.spawn(lambda: peer.recv(1 << 20))
        writer.get(timeout=5)
        drained.join(5)
        assert conn.stalled_at >= before
    finally:
        conn.abort()
        peer.close()


def test_a_close_to_a_peer_that_reads_nothing_gives_up_and_drops_the_connection():
    # a taken-over connection whose buffers are full, no write of ours under way: the 4409 must
    # not hold the pipe's supervisor for as long as the peer stays silent
    conn, peer = _small_buffered_pair()
    try:
        _fill(conn)
        assert not conn.writing
        with gevent.Timeout(5):
            assert conn.send_close(4409, "session taken over", timeout=0.2) is False
        assert conn.closed
    finally:
        conn.abort()
        peer.close()


def test_a_close_to_a_slow_peer_that_takes_bytes_is_waited_for():
    conn, peer = _small_buffered_pair()
    try:
        _fill(conn)

        def slow_reader():
            got = b""
            while b"\x88" not in got[-16:]:  # until the Close frame's first byte arrives
                got += peer.recv(1024)
                gevent.sleep(0.05)  # ok-sleep: the pace of a slow peer (20 KB/s), not a synchronisation
            return len(got)

        reader = gevent.spawn(slow_reader)
        pipe = _pipe_with_backend(conn, pong_timeout_s=0.5)  # its watchdog sees the progress too
        started = time.monotonic()
        with gevent.Timeout(30), pipe._holding(backend=True):  # far longer than 0.5 s without progress
            assert conn.send_close(1001, "draining", timeout=0.5) is True
        assert time.monotonic() - started > 0.5  # the Close waited longer than that, for a peer taking bytes
        assert pipe.telemetry.counters == Counter()
        assert not conn.closed
        assert reader.get(timeout=20) > 16384
    finally:
        conn.abort()
        peer.close()


def test_a_failed_write_to_one_side_does_not_skip_the_other_sides_actions():
    backend, backend_peer = _small_buffered_pair()
    client_sock, client_peer = gsocket.socketpair()
    client = Connection(client_sock, server_side=True, max_message_size=1 << 20)
    pipe = _pipe_with_backend(backend, pong_timeout_s=10)
    pipe.client = client
    pipe.session.generation = 1
    posted: list = []
    pipe._post = posted.append
    try:
        backend.abort()  # the backend's write fails
        with pipe._holding(backend=True, client=True):
            pipe._perform([SendToBackend([], fence=2), SendToClient([], fence=3), CloseClient(1001, "bye")])
        assert [type(event) for event in posted] == [BackendLost]
        client_peer.settimeout(5)
        parser = FrameParser(expect_masked=False)
        events = []
        while len(events) < 2:
            events += parser.feed(client_peer.recv(4096))
        assert events == [(OP_PING, encode_fence(3)), (OP_CLOSE, b"\x03\xe9bye")]
    finally:
        client.abort()
        client_peer.close()
        backend_peer.close()
