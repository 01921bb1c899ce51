"""A peer's answer held up on our side is not the peer's fault.

The proxy's reader of one peer writes what it reads to the other peer, so a slow
other peer holds it up, and what the first peer sent meanwhile, its Pong to our
ping fence included, waits unread in our socket. Such a peer is excused for as
long as the other one takes our bytes: a fast backend streaming to a slow client
is not failed over (which would lose what it had sent), and a client uploading
to a slow backend is not closed as unresponsive.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

from rawws import FakeBackend, RawClient, frame

from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, FrameParser

CHUNK = 256 * 1024


def _payload(i: int, size: int = CHUNK) -> bytes:
    return i.to_bytes(4, "big") * (size // 4)


class QueueingWriter:
    """Writes frames in the order they are queued, from a thread of its own: like a WebSocket
    stack that buffers outgoing messages (Node's ws, a browser), it sends its Pong after
    everything it queued before the Ping."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.frames: queue.Queue = queue.Queue()
        threading.Thread(target=self._write, daemon=True).start()

    def _write(self):
        while (data := self.frames.get()) is not None:
            try:
                self.sock.sendall(data)
            except OSError:
                return

    def stop(self):
        self.frames.put(None)


class StreamingBackend(FakeBackend):
    """On the message ``go``, queues ``count`` binary messages of ``size`` bytes for the client;
    answers pings in its queue, behind them."""

    def __init__(self, count: int, size: int):
        self.count, self.size = count, size
        super().__init__()

    def _serve(self, conn):
        threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        self._handshake(conn)
        writer = QueueingWriter(conn)
        parser = FrameParser(expect_masked=True)
        try:
            while data := conn.recv(65536):
                for opcode, payload in parser.feed(data):
                    if opcode == OP_BINARY and payload == b"go":
                        for i in range(self.count):
                            writer.frames.put(frame(OP_BINARY, _payload(i, self.size), mask=False))
                    elif opcode == OP_PING:
                        writer.frames.put(frame(OP_PONG, payload, mask=False))
                    elif opcode == OP_CLOSE:
                        writer.frames.put(frame(OP_CLOSE, payload, mask=False))
                        return
        except OSError:
            pass
        finally:
            writer.stop()


def _upload_and_read_echoes(client: RawClient, count: int, *, pings: bool = True) -> list[bytes]:
    """Queue ``count`` messages of 256 KiB at once and read their echoes; the proxy's pings (only
    with ``pings``) are answered in the queue, behind what is left of the upload, as a browser would."""
    writer = QueueingWriter(client.sock)
    for i in range(count):
        writer.frames.put(frame(OP_BINARY, _payload(i)))
    echoes: list[bytes] = []
    try:
        while len(echoes) < count:
            events = client.events()
            assert events, f"the proxy closed the client after {len(echoes)} echoes"
            for opcode, payload in events:
                if opcode == OP_PING and pings:
                    writer.frames.put(frame(OP_PONG, payload))
                else:
                    assert opcode == OP_BINARY, (opcode, payload[:40])
                    echoes.append(payload)
    finally:
        writer.stop()
    return echoes


def test_a_fast_backend_is_not_failed_over_while_a_slow_client_holds_its_pong_up(processes):
    count, size = 64, CHUNK  # 16 MiB, read by the client in well over the pong timeout
    backend = StreamingBackend(count, size)
    # resume off: the client gets no pings, so only the backend's answers can be late
    proxy = processes.proxy("--backend", backend.url, "--pong-timeout", "0.5", "--resume-grace", "0",
                            "--buffer-limit", "64MiB")
    client = RawClient(proxy.port, rcvbuf=65536)
    try:
        assert client.handshake() == 101
        client.send(frame(OP_BINARY, b"go"))
        received = [payload for _, payload in client.parser.feed(client.rest)]
        while len(received) < count and (data := client.sock.recv(65536)):
            received += [payload for _, payload in client.parser.feed(data)]  # data frames only
            time.sleep(0.004)  # ok-sleep: the pace of a slow client (at most 16 MB/s), not a synchronisation
        # the fence after "go" is answered behind the 16 MiB: without the excuse the backend
        # would be failed over after 0.5 s, the rest of its stream lost and "go" replayed
        assert [p[:4] for p in received] == [i.to_bytes(4, "big") for i in range(count)]
        assert received == [_payload(i, size) for i in range(count)]
        assert len(backend.connections) == 1
        counters = proxy.admin("GET", path="/admin/status")[1]["counters"]
        assert counters.get("failovers", 0) == 0 and counters["backend_answers_excused"] >= 1
    finally:
        client.close()
        backend.close()


def test_a_client_is_not_closed_while_a_slow_backend_holds_its_pong_up(processes):
    count = 48  # 12 MiB, echoed by a backend that takes 256 KiB every 20 ms
    slow = processes.echo("--work-ms", "40", name="slow")
    # at-most-once and no keepalive: the backend gets no fences, so only the client's answers
    # can be late; resume on: the client gets fences and must answer them
    proxy = processes.proxy("--backend", slow.url, "--pong-timeout", "0.5", "--resume-grace", "30",
                            "--delivery", "at-most-once", "--keepalive", "0", "--buffer-limit", "64MiB")
    client = RawClient(proxy.port)
    try:
        assert client.handshake() == 101
        assert _upload_and_read_echoes(client, count) == [_payload(i) for i in range(count)]
        counters = proxy.admin("GET", path="/admin/status")[1]["counters"]
        assert counters["client_answers_excused"] >= 1
        assert not any(key.startswith("clients_") for key in counters), counters
    finally:
        client.close()


# Flow control: with the defaults (at-least-once, resume on, a 5 MiB cap) a live peer that takes
# a burst larger than the cap is waited for, its sender held back through TCP, instead of the
# client being closed with 1013 (the cap is for what waits while no backend is there).

def test_a_burst_larger_than_the_cap_to_a_live_backend_is_held_back_not_refused(processes):
    count = 64  # 16 MiB sent at once: far past the 5 MiB cap before the backend's first Pong
    echo = processes.echo(name="echo")
    proxy = processes.proxy("--backend", echo.url, "--resume-grace", "0")  # no client fences: its Pongs
    client = RawClient(proxy.port)                                         # would queue behind the burst
    try:
        assert client.handshake() == 101
        assert _upload_and_read_echoes(client, count, pings=False) == [_payload(i) for i in range(count)]
    finally:
        client.close()


def test_a_stream_larger_than_the_cap_to_a_client_reading_it_is_held_back_not_refused(processes):
    count = 64  # 16 MiB streamed to a client that reads at up to 16 MB/s and answers every ping
    backend = StreamingBackend(count, CHUNK)
    proxy = processes.proxy("--backend", backend.url)  # resume on: what the client has not acknowledged counts
    client = RawClient(proxy.port, rcvbuf=65536)
    try:
        assert client.handshake() == 101
        client.send(frame(OP_BINARY, b"go"))
        received = []
        events = client.parser.feed(client.rest)
        while True:
            for opcode, payload in events:
                if opcode == OP_PING:
                    client.send(frame(OP_PONG, payload))
                else:
                    assert opcode == OP_BINARY, (opcode, payload[:40])
                    received.append(payload)
            if len(received) == count:
                break
            data = client.sock.recv(65536)
            assert data, f"the proxy closed the client after {len(received)} messages"
            events = client.parser.feed(data)
            time.sleep(0.004)  # ok-sleep: the pace of a slow client (at most 16 MB/s), not a synchronisation
        assert received == [_payload(i) for i in range(count)]
    finally:
        client.close()
        backend.close()


class HeldPongBackend(FakeBackend):
    """Records every data message as it reads it; answers pings only once ``answer`` is set."""

    def __init__(self):
        self.got: list[bytes] = []
        self.arrived = threading.Condition()
        self.answer = threading.Event()
        super().__init__()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.got) >= count, timeout)

    def _serve(self, conn):
        threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        self._handshake(conn)
        writer = QueueingWriter(conn)
        parser = FrameParser(expect_masked=True, max_message_size=1 << 30)
        held: list[bytes] = []
        lock = threading.Lock()

        def release():  # once answering, the held pongs go, and every later one at once
            if self.answer.wait(30):
                with lock:
                    for pong in held:
                        writer.frames.put(pong)
                    held.clear()
        threading.Thread(target=release, daemon=True).start()
        try:
            while data := conn.recv(65536):
                for opcode, payload in parser.feed(data):
                    if opcode == OP_PING:
                        with lock:
                            pong = frame(OP_PONG, payload, mask=False)
                            if self.answer.is_set():
                                writer.frames.put(pong)
                            else:
                                held.append(pong)
                    elif opcode == OP_BINARY:
                        with self.arrived:
                            self.got.append(payload[:6])
                            self.arrived.notify_all()
        except OSError:
            pass
        finally:
            writer.stop()


def test_after_a_takeover_a_batch_held_for_room_still_goes_first(processes):
    backend = HeldPongBackend()
    proxy = processes.proxy("--backend", backend.url, "--buffer-limit", "1MiB")  # room: half, 512 KiB
    old = RawClient(proxy.port)
    new = None
    try:
        assert old.handshake() == 101
        for i in range(4):  # 512 KiB: the window is full once the backend has them
            old.send(frame(OP_BINARY, b"old-%02d" % i + bytes(128 * 1024 - 6)))
        assert backend.wait_for(4, 10)
        # sent after the four arrived, so never in their batch: read, then held until the backend acknowledges
        old.send(frame(OP_BINARY, b"old-04" + bytes(128 * 1024 - 6)))
        new = RawClient(proxy.port, old.path)  # takes the session over while old-04 is held
        assert new.handshake() == 101
        new.send(frame(OP_BINARY, b"new-01"))
        assert not backend.wait_for(5, 1.0), backend.got  # nothing overtakes the held batch
        backend.answer.set()
        assert backend.wait_for(6, 10), backend.got
        assert backend.got == [b"old-00", b"old-01", b"old-02", b"old-03", b"old-04", b"new-01"]
    finally:
        old.close()
        if new is not None:
            new.close()
        backend.close()
