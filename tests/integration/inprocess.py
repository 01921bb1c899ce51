"""Pipes built in the test's own process, with no PipeManager and no proxy process.

* :func:`make_pipe`: a pipe from stand-ins for its narrow interfaces (by default an empty pool
  of backends and real telemetry), its greenlets not started.
* :class:`Rig`: a pipe's whole runtime in this process, on a clock the test moves
  (:class:`FakeClock`). Its backends (:class:`Backend`) are WebSocket servers run by greenlets of
  this process on 127.0.0.1:0, leased through a real :class:`~iwsproxy.pool.BackendPool`
  (:class:`PoolLeases`); its clients are socket pairs, the pipe holding one end as a
  :class:`~iwsproxy.io.connection.Connection`, the test the other (:class:`Peer`, raw frames).

Time. Every time a pipe gives its session comes from the rig's clock, which moves only when the
test moves it (:meth:`Rig.tick`); a tick wakes the pipes so that their supervisors look at the new
time. Deadlines fire on ticks, never on real waits: real-time waits of the runtime (its
supervisor's timer, computed as deadline minus clock, the write locks' stuck-write watchdog of
``pong_timeout_s``, a Close's wait for a silent peer) are either long or, where a test means them
to run, short and named in that test. A connection a pipe holds notes when its writes last had to
wait for the peer (``Connection.stalled_at``) on the pipe's clock too.

This process is not monkey-patched; the proxy's processes are, so websocket-client opens their
backend connections on gevent sockets. A rig gives websocket-client gevent's socket module while it
is open, so a pipe connects to the rig's backends as it does in the proxy.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import time
import uuid

import gevent
import websocket._http as websocket_http
from gevent import socket as gsocket
from gevent.event import Event
from gevent.pool import Group
from gevent.queue import Empty, Queue

from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameParser, MaskSource, encode_frame
from iwsproxy.frames import encode_close_payload, parse_close_payload
from iwsproxy.io.backend import ClientOffer
from iwsproxy.io.connection import Connection
from iwsproxy.io.events import RESCHEDULED
from iwsproxy.io.pipe import PersistentPipe
from iwsproxy.io.ports import Telemetry
from iwsproxy.pool import BackendPool
from iwsproxy.settings import Settings

__all__ = ["NoBackends", "make_pipe", "FakeClock", "PoolLeases", "RecordingTelemetry", "Peer", "Backend", "Rig"]

WAIT_S = 5.0  # how long a test waits for something it expects; far longer than it takes


class NoBackends:
    """Backend leases from a pool that has none: a pipe that asks waits."""

    def __init__(self) -> None:
        self.waiting: set = set()

    def acquire_backend(self, exclude):
        return None

    def release_backend(self, backend, *, failed, cause=""):
        pass

    def backend_succeeded(self, url):
        pass

    def pool_size(self) -> int:
        return 0

    def wait_for_backend(self, pipe) -> None:
        self.waiting.add(pipe)

    def stop_waiting(self, pipe) -> None:
        self.waiting.discard(pipe)


def make_pipe(client_id: str = "in-process", *, leases=None, telemetry: Telemetry | None = None,
              clock=time.monotonic, supervisors: Group | None = None, **settings) -> PersistentPipe:
    """A pipe whose settings are the defaults but for ``settings`` (Settings' field names), leasing
    from ``leases`` (default: :class:`NoBackends`); nothing of it runs yet."""
    return PersistentPipe(client_id, ClientOffer(client_id=client_id), settings=Settings(**settings),
                          leases=leases if leases is not None else NoBackends(),
                          telemetry=telemetry if telemetry is not None else Telemetry(), clock=clock,
                          supervisors=supervisors)


class FakeClock:
    """A monotonic clock that moves only when told: ``clock()`` is ``clock.now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class PoolLeases:
    """Backend leases from a real :class:`BackendPool` on ``clock``, with PipeManager's rules:
    a failed lease counts against its backend, and every release and every backend added wakes
    the pipes waiting for one. ``acquired`` lists every request as (what it excluded, the URL
    given or None), in order."""

    def __init__(self, clock, *, policy: str = "round_robin", max_failures: int = 3,
                 eject_base_s: float = 1.0, eject_max_s: float = 60.0) -> None:
        self.clock = clock
        self.pool = BackendPool(policy=policy, max_failures=max_failures, eject_base_s=eject_base_s,
                                eject_max_s=eject_max_s)
        self.acquired: list[tuple[frozenset, str | None]] = []
        self.waiting: set = set()

    def add(self, url: str) -> None:
        """Add a backend to the pool, waking the pipes that wait for one."""
        if self.pool.add(url):
            self._wake_waiting()

    def acquire_backend(self, exclude):
        backend = self.pool.acquire(self.clock(), exclude=exclude)
        self.acquired.append((frozenset(exclude), backend.url if backend is not None else None))
        return backend

    def release_backend(self, backend, *, failed, cause=""):
        current = self.pool.get(backend.url) is backend
        self.pool.release(backend)
        if failed and current:
            self.pool.record_failure(backend.url, self.clock(), cause)
        self._wake_waiting()

    def backend_succeeded(self, url):
        self.pool.record_success(url, self.clock())

    def pool_size(self) -> int:
        return len(self.pool)

    def wait_for_backend(self, pipe) -> None:
        self.waiting.add(pipe)

    def stop_waiting(self, pipe) -> None:
        self.waiting.discard(pipe)

    def _wake_waiting(self) -> None:
        for pipe in list(self.waiting):
            pipe.wake()


class RecordingTelemetry(Telemetry):
    """Real telemetry that also keeps, in order, what the pipe reported in ``events``:
    ("count", name), ("resume", kind), ("closed", code, cause), ("failover", from, to, cause)."""

    __slots__ = ("events", "_changed")

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []
        self._changed = Event()

    def _record(self, event: tuple) -> None:
        self.events.append(event)
        self._changed.set()

    def count(self, name: str, n: int = 1) -> None:
        super().count(name, n)
        self._record(("count", name))

    def client_closed(self, code: int, cause: str | None = None) -> None:
        super().client_closed(code, cause)
        self._record(("closed", code, cause))

    def resume_event(self, kind: str) -> None:
        super().resume_event(kind)
        self._record(("resume", kind))

    def failover(self, report) -> None:
        super().failover(report)
        self._record(("failover", report.from_url, report.to_url, report.cause))

    def wait_for(self, *prefix, timeout: float = WAIT_S) -> tuple:
        """The first event reported that begins with ``prefix`` (waiting up to ``timeout`` for one;
        AssertionError if none comes)."""
        with gevent.Timeout(timeout, AssertionError(f"no {prefix} reported within {timeout} s: {self.events}")):
            while True:
                for event in self.events:
                    if event[:len(prefix)] == prefix:
                        return event
                self._changed.clear()
                self._changed.wait()


class Peer:
    """The test's end of one WebSocket connection, speaking raw frames (:mod:`iwsproxy.frames`).

    ``role="client"`` masks what it sends and expects unmasked frames, ``"backend"`` the reverse.
    Unless ``reading`` is False, a reader greenlet (in ``group``) takes every frame: data messages
    go to ``received`` and the ``messages`` queue, Ping payloads to ``pings`` (answered unless
    ``answer_pings`` is False); a Close is answered with the same code and ends the reading. When
    the reading ends ``ended`` is set, with ``close_code`` and ``close_reason`` (None and "" at
    EOF). A backend with ``echo`` sends every data message back. ``request`` is the HTTP upgrade
    request it got.
    """

    def __init__(self, sock, role: str, group: Group, *, reading: bool = True, answer_pings: bool = True,
                 echo: bool = False, request: bytes = b"", rest: bytes = b"") -> None:
        self.sock = sock
        self.role = role
        self.request = request
        self.answer_pings = answer_pings
        self.echo = echo
        self._mask = MaskSource() if role == "client" else None
        self._parser = FrameParser(expect_masked=role == "backend", max_message_size=1 << 30)
        self.received: list[tuple[int, bytes]] = []
        self.messages: Queue = Queue()
        self.pings: list[bytes] = []
        self._pinged = Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.ended = Event()
        self._group = group
        self._reader = group.spawn(self._read, rest) if reading else None

    # ---- sending ----
    def send(self, *messages) -> None:
        """Send data messages: str as text, bytes as binary."""
        self.sock.sendall(b"".join(
            encode_frame(OP_TEXT, m.encode(), mask_source=self._mask) if isinstance(m, str)
            else encode_frame(OP_BINARY, m, mask_source=self._mask) for m in messages))

    def pong(self, payload: bytes) -> None:
        self.sock.sendall(encode_frame(OP_PONG, payload, mask_source=self._mask))

    def close(self, code: int, reason: str = "") -> None:
        """Send a Close frame (the reader gets the reply)."""
        self.sock.sendall(encode_frame(OP_CLOSE, encode_close_payload(code, reason), mask_source=self._mask))

    # ---- receiving ----
    def next_messages(self, count: int, timeout: float = WAIT_S) -> list:
        """The next ``count`` data messages as payloads (text decoded), in order."""
        got = []
        try:
            for _ in range(count):
                opcode, payload = self.messages.get(timeout=timeout)
                got.append(payload.decode() if opcode == OP_TEXT else bytes(payload))
        except Empty:
            raise AssertionError(f"{self.role} got {got}, not {count} messages, within {timeout} s") from None
        return got

    def wait_ping(self, count: int = 1, timeout: float = WAIT_S) -> bytes:
        """Wait until ``count`` Pings have come in all; the latest payload."""
        with gevent.Timeout(timeout, AssertionError(f"{self.role} got {len(self.pings)} pings, not {count}")):
            while len(self.pings) < count:
                self._pinged.clear()
                self._pinged.wait()
        return self.pings[-1]

    def wait_ended(self, timeout: float = WAIT_S) -> int | None:
        """Wait until the reading ends; the Close code the peer got (None: EOF without one)."""
        if not self.ended.wait(timeout):
            raise AssertionError(f"the {self.role}'s connection did not end within {timeout} s")
        return self.close_code

    def _read(self, rest: bytes) -> None:
        sock, parser = self.sock, self._parser
        try:
            data = rest
            while True:
                if not data:
                    data = sock.recv(256 * 1024)
                    if not data:
                        return
                events, data = parser.feed(data), b""
                replies = []
                for opcode, payload in events:
                    if opcode == OP_PING:
                        self.pings.append(bytes(payload))
                        self._pinged.set()
                        if self.answer_pings:
                            replies.append(encode_frame(OP_PONG, payload, mask_source=self._mask))
                    elif opcode == OP_CLOSE:
                        code, self.close_reason = parse_close_payload(payload)
                        self.close_code = code
                        sock.sendall(b"".join(replies) + encode_frame(
                            OP_CLOSE, encode_close_payload(code), mask_source=self._mask))
                        return
                    elif opcode != OP_PONG:
                        self.received.append((opcode, payload))
                        self.messages.put((opcode, payload))
                        if self.echo:
                            replies.append(encode_frame(opcode, payload, mask_source=self._mask))
                if replies:
                    sock.sendall(b"".join(replies))
        except OSError:
            pass
        finally:
            self.ended.set()

    # ---- failing ----
    def freeze(self) -> None:
        """Stop reading until :meth:`thaw` (the connection stays open): what the pipe writes piles
        up. The receive buffer shrinks to its least, so that over TCP the pipe's write stops moving
        as soon as it has begun (the kernel would otherwise take in bytes for a while)."""
        if self._reader is not None:
            self._reader.kill()
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        except OSError:
            pass  # closed

    def thaw(self) -> None:
        """Read again after :meth:`freeze` (or from the start, if made with ``reading=False``)."""
        self.ended.clear()
        self._reader = self._group.spawn(self._read, b"")

    def kill(self) -> None:
        """Drop the connection at once, as a killed process's kernel does (the pipe reads EOF)."""
        self.freeze()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.ended.set()


class Backend:
    """A WebSocket backend served by greenlets of this process on 127.0.0.1:0.

    Each connection it accepts becomes a :class:`Peer` in the backend role (``echo``,
    ``answer_pings`` as given), put on ``connections`` (a queue) and kept in ``peers``. Each upgrade
    request is put on ``upgrades`` as it comes; while ``handshakes`` is clear, it waits for it
    before it is answered.
    """

    def __init__(self, group: Group, *, echo: bool = True, answer_pings: bool = True) -> None:
        self._group = group
        self.echo = echo
        self.answer_pings = answer_pings
        self._listener = gsocket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.url = f"ws://127.0.0.1:{self._listener.getsockname()[1]}/"
        self.handshakes = Event()
        self.handshakes.set()
        self.peers: list[Peer] = []
        self.connections: Queue = Queue()
        self.upgrades: Queue = Queue()
        self._acceptor = group.spawn(self._accept)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._group.spawn(self._serve, sock)

    def _serve(self, sock) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                sock.close()
                return
            data += chunk
        request, _, rest = data.partition(b"\r\n\r\n")
        self.upgrades.put(request)
        self.handshakes.wait()
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        peer = Peer(sock, "backend", self._group, echo=self.echo, answer_pings=self.answer_pings,
                    request=request, rest=rest)
        self.peers.append(peer)
        self.connections.put(peer)

    def next_connection(self, timeout: float = WAIT_S) -> Peer:
        try:
            return self.connections.get(timeout=timeout)
        except Empty:
            raise AssertionError(f"no connection to {self.url} within {timeout} s") from None

    def stop(self) -> None:
        """Refuse new connections (the port is closed) and drop those it has."""
        self._listener.close()
        for peer in self.peers:
            peer.kill()


def reconnects(peer: Peer) -> int:
    """The X-Iwsproxy-Reconnects header of the upgrade request a backend peer got."""
    for line in peer.request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-iwsproxy-reconnects":
            return int(value)
    raise AssertionError(f"no reconnect count in {peer.request!r}")


class _GeventSockets:
    """gevent's socket module for websocket-client, but for name lookup: the rig's backends are on
    127.0.0.1, which the C library resolves at once (gevent's resolver would use a thread)."""

    getaddrinfo = staticmethod(socket.getaddrinfo)

    def __getattr__(self, name):
        return getattr(gsocket, name)


class _NotedPolls:
    """A session that notes in ``turns`` the time of each ``poll`` (the session does the work)."""

    def __init__(self, session, turns: Queue) -> None:
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_turns", turns)

    def poll(self, now):
        actions = self._session.poll(now)
        self._turns.put(now)
        return actions

    def __getattr__(self, name):
        return getattr(self._session, name)

    def __setattr__(self, name, value):
        setattr(self._session, name, value)


class Rig:
    """A fake clock, backends, leases and pipes in this process; :meth:`close` tears all down and
    checks that no greenlet of a pipe is left.

    The pool (``leases.pool``) has the defaults of :class:`BackendPool`; a test may change its
    attributes (policy, max_failures...). The pipes' supervisors run in ``supervisors``, the
    backends' and the test peers' greenlets in ``group``."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.group = Group()
        self.supervisors = Group()
        self.leases = PoolLeases(self.clock)
        self.backends: list[Backend] = []
        self.pipes: list[PersistentPipe] = []
        self.clients: list[Peer] = []
        self._turns: dict[PersistentPipe, Queue] = {}
        self._saved_sockets = websocket_http.socket
        websocket_http.socket = _GeventSockets()

    # ---- backends ----
    def backend(self, *, echo: bool = True, answer_pings: bool = True, in_pool: bool = True) -> Backend:
        backend = Backend(self.group, echo=echo, answer_pings=answer_pings)
        self.backends.append(backend)
        if in_pool:
            self.leases.add(backend.url)
        return backend

    # ---- pipes and clients ----
    def open_pipe(self, client_id: str | None = None, *, answer_pings: bool = True, reading: bool = True,
                  **settings) -> tuple[PersistentPipe, Peer]:
        """A pipe started as PipeManager starts one: its first backend connected (or, none being
        reachable, waited for), then its first client connection; returns it and that client.

        ``settings`` are Settings' fields; ``park_after_s`` is 60 unless given, so that, like every
        other deadline of the defaults, the supervisor's timer for it (a real-time wait of deadline
        minus clock) never runs out during a test."""
        client_id = client_id or str(uuid.uuid4())
        settings.setdefault("park_after_s", 60.0)
        pipe = make_pipe(client_id, leases=self.leases, telemetry=RecordingTelemetry(), clock=self.clock,
                         supervisors=self.supervisors, **settings)
        self._watch_turns(pipe)
        self.pipes.append(pipe)
        pipe.connect_first(allow_waiting=True)
        conn, client = self._client_pair(pipe, answer_pings=answer_pings, reading=reading)
        pipe.start(conn)
        return pipe, client

    def connect_client(self, pipe: PersistentPipe, *, answer_pings: bool = True, reading: bool = True) -> Peer:
        """A new client connection with the pipe's id, handed to it (a resume or a takeover)."""
        conn, client = self._client_pair(pipe, answer_pings=answer_pings, reading=reading)
        pipe.attach(conn)
        return client

    def _client_pair(self, pipe: PersistentPipe, **options) -> tuple[Connection, Peer]:
        ours, theirs = gsocket.socketpair()
        conn = Connection(ours, server_side=True, max_message_size=pipe.settings.max_message_size_bytes,
                          max_fragments=pipe.settings.max_fragments)
        client = Peer(theirs, "client", self.group, **options)
        self.clients.append(client)
        return conn, client

    # ---- time ----
    def tick(self, seconds: float) -> float:
        """Move the clock on and wake every pipe to look at the new time; returns the time."""
        return self.tick_to(self.clock.now + seconds)

    def tick_to(self, when: float) -> float:
        """Set the clock to ``when`` exactly and wake every pipe to look at it; returns it."""
        self.clock.now = when
        for pipe in self.pipes:
            pipe._post(RESCHEDULED)
        return when

    @staticmethod
    def quiesce() -> None:
        """Return once the event loop has nothing left to do: every greenlet that was ready has
        run until it waits, every socket of this process with bytes for its reader has been read
        (socket pairs and loopback hand bytes over within the send). Before asserting that
        something was *not* sent or read."""
        gevent.idle()

    def settle(self, pipe: PersistentPipe, timeout: float = WAIT_S) -> None:
        """Return once the pipe's supervisor has gone once round its loop after this call, at the
        clock's time, and the peers have read what it wrote: what was due then (a connect round,
        a fence, a deadline) has been done. Before asserting that something did *not* happen."""
        turns = self._turns[pipe]
        while not turns.empty():
            turns.get()
        pipe._post(RESCHEDULED)
        pipe._post(RESCHEDULED)
        try:
            turns.get(timeout=timeout)  # this turn may have begun before the call
            turns.get(timeout=timeout)  # this one began after it
        except Empty:
            raise AssertionError(f"the pipe's supervisor took no turn within {timeout} s "
                                 f"(session {pipe.session.state.value})") from None
        self.quiesce()  # and the peers have read what it wrote

    def _watch_turns(self, pipe: PersistentPipe) -> None:
        """Note each ``session.poll`` the supervisor makes, one per turn of its loop (the session's
        own ``poll`` does the work)."""
        turns = self._turns[pipe] = Queue()
        pipe.session = _NotedPolls(pipe.session, turns)

    # ---- teardown ----
    def close(self) -> None:
        try:
            for peer in self.clients + [p for b in self.backends for p in b.peers]:
                peer.kill()  # the pipes' readers see EOF at once: no close handshake to wait for
            for pipe in self.pipes:
                if pipe.running:
                    pipe.stop()
                else:
                    pipe.abandon()
            for pipe in self.pipes:
                assert pipe.wait_closed(WAIT_S), "a pipe did not tear down"
            for backend in self.backends:
                backend.stop()
            assert self.supervisors.join(WAIT_S), "a supervisor outlived its pipe"
            for pipe in self.pipes:
                assert not pipe._group, "a reader outlived its pipe"
        finally:
            self.group.kill(timeout=WAIT_S)
            self.supervisors.kill(timeout=WAIT_S)
            websocket_http.socket = self._saved_sockets
