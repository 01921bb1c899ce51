"""Sessions that outlive a proxy process: adopted from a snapshot, evacuated, resumed anywhere."""

from __future__ import annotations

import json
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import websocket
from gevent import socket as gsocket

from conftest import needs, stats, wait_for
from rawws import DeafBackend
from inprocess import WAIT_S, Peer, Rig, reconnects
from redis_server import RedisServer, redis_server_missing
from iwsproxy.app import IWSProxy, create_app
from iwsproxy.exceptions import CapacityExceeded, DuplicateClient, SnapshotError
from iwsproxy.frames import OP_TEXT
from iwsproxy.io.backend import ClientOffer
from iwsproxy.io.carry import export_pipe, offer_to_json
from iwsproxy.io.server import make_server
from iwsproxy.session import Session
from iwsproxy.settings import Settings
from iwsproxy.tokens import sign

pytestmark = pytest.mark.timeout(60)


# ---- an in-process proxy: the app and its server in this process, the rig's backends ----

class InProcessProxy:
    """``create_app(settings)`` served on 127.0.0.1:0 by greenlets of this process."""

    def __init__(self, rig: Rig, **settings) -> None:
        settings.setdefault("park_after_s", 60.0)
        self.rig = rig
        self.app = create_app(Settings(**settings))
        self.manager = IWSProxy.manager(self.app)
        self.server = make_server(self.app, ("127.0.0.1", 0))
        self.server.start()
        self.port = self.server.address[1]

    def connect(self, client_id: str, *, token: str | None = None, answer_pings: bool = True) -> tuple[int, Peer | None]:
        """Upgrade a raw connection to ``/<client_id>``: the status, and the client (on a 101)."""
        sock = gsocket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S)
        query = f"?token={token}" if token else ""
        sock.sendall((f"GET /{client_id}{query} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        if status != 101:
            sock.close()
            return status, None
        sock.settimeout(None)
        client = Peer(sock, "client", self.rig.group, answer_pings=answer_pings, rest=rest)
        self.rig.clients.append(client)
        return status, client

    def close(self) -> None:
        self.server.close()
        assert self.manager.close_all(1001, "test over", timeout=WAIT_S), "a pipe did not close"
        self.server.stop(timeout=1)


@pytest.fixture
def rig():
    rig = Rig()
    proxies: list[InProcessProxy] = []
    rig.proxy = lambda **settings: proxies.append(InProcessProxy(rig, **settings)) or proxies[-1]
    try:
        yield rig
    finally:
        try:
            for proxy in proxies:
                proxy.close()
        finally:
            rig.close()


def built_snapshot(client_id: str, *, detached: bool, grace_s: float = 30.0, saved_ago_s: float = 0.0) -> bytes:
    """The snapshot of a session whose backend read none of c1, c2 (their Pong never came) and
    that got c3 while failing over, and whose client got b1 without acknowledging it, b2 being
    held for it: a failover and a resume each owe something."""
    now = 50.0
    session = Session(buffer_limit_bytes=1 << 20, now=now, resume_grace_s=grace_s)
    session.backend_connected(now, "ws://old-backend/")
    session.client_messages([(OP_TEXT, b"c1"), (OP_TEXT, b"c2")], now)
    session.backend_messages([(OP_TEXT, b"b1")], now)
    session.backend_lost(session.generation, now, "test")
    session.client_messages([(OP_TEXT, b"c3")], now)
    if detached:
        session.client_detached(now)
        session.backend_messages([(OP_TEXT, b"b2")], now)
    offer = ClientOffer(client_id=client_id, remote_addr="192.0.2.7", path="/")
    return session.export(now, {"client_id": client_id, "subprotocol": None, "age_s": 12.0,
                                "offer": offer_to_json(offer), "saved_at": time.time() - saved_ago_s})


# ---- adopting a session ----

def test_an_adopted_session_replays_to_its_new_backend_and_resumes_its_client_in_order(rig):
    backend = rig.backend(echo=False)
    proxy = rig.proxy(backends=(backend.url,), resume_grace_s=30.0, resume_secret="s3cret")
    client_id = str(uuid.uuid4())
    pipe = proxy.manager.adopt_session(built_snapshot(client_id, detached=True))
    assert pipe is not None and pipe.client_id == client_id
    peer = backend.next_connection()
    assert reconnects(peer) == 1, "the backend sees a reconnect, as after a failover"
    assert peer.next_messages(3) == ["c1", "c2", "c3"], "unacknowledged, then buffered, in order"
    peer.send("b3")  # held for the detached client
    listed = proxy.manager.pipes()
    assert [(p["client"], p["state"]) for p in listed] == [(client_id[:8], "detached")]
    assert listed[0]["age_s"] >= 12.0
    assert proxy.connect(client_id)[0] == 403, "a resume needs the token, as on the process that exported it"
    assert proxy.connect(client_id, token=sign("other", client_id))[0] == 403
    status, client = proxy.connect(client_id, token=sign("s3cret", client_id))
    assert status == 101
    assert client.next_messages(3) == ["b1", "b2", "b3"], "unacknowledged, then held, then live, in order"
    client.send("c4")
    assert peer.next_messages(1) == ["c4"]
    peer.send("b4")
    assert client.next_messages(1) == ["b4"]
    assert proxy.manager.counters["sessions_adopted"] == 1
    assert proxy.manager.counters["clients_resumed"] == 1
    assert len(backend.peers) == 1


def test_an_attached_session_is_adopted_detached_and_its_client_gets_back_what_it_had_not_acknowledged(rig):
    backend = rig.backend(echo=False)
    proxy = rig.proxy(backends=(backend.url,), resume_grace_s=30.0)
    client_id = str(uuid.uuid4())
    proxy.manager.adopt_session(built_snapshot(client_id, detached=False))
    peer = backend.next_connection()
    assert peer.next_messages(3) == ["c1", "c2", "c3"]
    status, client = proxy.connect(client_id)
    assert status == 101
    assert client.next_messages(1) == ["b1"]


def test_a_pipe_exported_live_is_adopted_by_another_process_without_loss(rig):
    backend = rig.backend(echo=False, answer_pings=False)  # acknowledges nothing: all is replayed
    first = rig.proxy(backends=(backend.url,), resume_grace_s=30.0)
    second = rig.proxy(backends=(backend.url,), resume_grace_s=30.0)
    client_id = str(uuid.uuid4())
    status, client = first.connect(client_id, answer_pings=False)
    assert status == 101
    old_peer = backend.next_connection()
    client.send("one", "two")
    assert old_peer.next_messages(2) == ["one", "two"]
    old_peer.send("uno")
    assert client.next_messages(1) == ["uno"]
    (pipe,) = first.manager._pipes.values()
    snapshot = export_pipe(pipe)
    client.kill()
    old_peer.kill()
    adopted = second.manager.adopt_session(snapshot)
    assert adopted.subprotocol is None and adopted.offer == pipe.offer
    peer = backend.next_connection()
    assert reconnects(peer) == 1
    assert peer.next_messages(2) == ["one", "two"]
    status, again = second.connect(client_id)
    assert status == 101
    assert again.next_messages(1) == ["uno"]


def test_an_adopted_session_nobody_resumes_ends_with_the_grace(rig):
    backend = rig.backend(echo=False)
    proxy = rig.proxy(backends=(backend.url,), resume_grace_s=0.3)
    client_id = str(uuid.uuid4())
    pipe = proxy.manager.adopt_session(built_snapshot(client_id, detached=True, grace_s=0.3))
    peer = backend.next_connection()
    assert pipe.wait_closed(WAIT_S), "the grace ended the session"
    assert peer.wait_ended() == 1000, "its backend is closed"
    assert proxy.manager.counters["clients_expired"] == 1
    assert len(proxy.manager) == 0 and proxy.manager.budget.used_bytes == 0
    status, client = proxy.connect(client_id)
    assert status == 101, "the id starts a new session"


def test_a_session_whose_grace_ran_out_at_rest_is_not_adopted(rig):
    proxy = rig.proxy(backends=(rig.backend().url,), resume_grace_s=5.0)
    client_id = str(uuid.uuid4())
    assert proxy.manager.adopt_session(built_snapshot(client_id, detached=True, saved_ago_s=6.0)) is None
    assert len(proxy.manager) == 0 and proxy.manager.budget.used_bytes == 0
    assert proxy.manager.adopt_session(built_snapshot(client_id, detached=True, saved_ago_s=1.0)) is not None


def test_adopting_refuses_a_live_duplicate_a_bad_snapshot_and_a_full_budget(rig):
    backend = rig.backend(echo=False)
    proxy = rig.proxy(backends=(backend.url,), resume_grace_s=30.0, global_buffer_limit_bytes=1000)
    client_id = str(uuid.uuid4())
    snapshot = built_snapshot(client_id, detached=True)
    assert proxy.manager.adopt_session(snapshot) is not None
    used = proxy.manager.budget.used_bytes
    with pytest.raises(DuplicateClient):
        proxy.manager.adopt_session(snapshot)
    corrupted = bytearray(snapshot)
    corrupted[-1] ^= 1
    with pytest.raises(SnapshotError):
        proxy.manager.adopt_session(bytes(corrupted))
    with pytest.raises(SnapshotError):
        proxy.manager.adopt_session(Session(buffer_limit_bytes=100, now=0.0).export(0.0, {}))  # no client
    big = Session(buffer_limit_bytes=1 << 20, now=0.0, resume_grace_s=30.0)
    big.client_messages([(OP_TEXT, b"x" * 2000)], 0.0)
    other = str(uuid.uuid4())
    with pytest.raises(CapacityExceeded):
        proxy.manager.adopt_session(big.export(0.0, {"client_id": other,
                                                     "offer": offer_to_json(ClientOffer(client_id=other))}))
    assert proxy.manager.budget.used_bytes == used, "what was refused holds nothing"
    assert len(proxy.manager) == 1


# ---- a fleet: `iwsproxy serve` processes sharing one real Redis ----

class FleetClient:
    """A client streaming ``0, 1, 2...`` (one every ``interval_s``) to an echo backend through a
    fleet; when its proxy closes it (1012, or its connection drops), it reconnects with its id to
    the next proxy of ``proxies`` that lets it in, and sends on. ``received`` is every echo, in
    order of arrival."""

    def __init__(self, proxies: list, interval_s: float, stop: threading.Event, *, first: int = 0):
        self.client_id = str(uuid.uuid4())
        self.proxies = proxies
        self.at = first
        self.interval_s = interval_s
        self.stop = stop
        self.sent = 0
        self.received: list[int] = []
        self.closes: list[int | None] = []
        self.reconnects = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._ws = self._connect(first_time=True)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self, first_time: bool = False) -> websocket.WebSocket:
        deadline = time.monotonic() + 20
        while True:
            proxy = self.proxies[self.at % len(self.proxies)]
            try:
                return websocket.create_connection(proxy.url_for(self.client_id), timeout=10)
            except (OSError, websocket.WebSocketException) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"client {self.client_id[:8]} found no proxy to resume on: {exc}")
                self.at += 1  # that one refuses (shutting down, or gone): the next
                time.sleep(0.05)  # ok-sleep: a client's pause between reconnect attempts

    def start(self) -> "FleetClient":
        self._thread.start()
        return self

    def _run(self) -> None:
        ws = self._ws
        try:
            while True:
                if not self.stop.is_set():
                    try:
                        ws.send(str(self.sent))
                        self.sent += 1
                    except (OSError, websocket.WebSocketException):
                        pass  # its Close is on the way, or the connection dropped: read it below
                ws.settimeout(self.interval_s)
                try:
                    while True:
                        opcode, data = ws.recv_data(control_frame=True)
                        if opcode == websocket.ABNF.OPCODE_CLOSE:
                            raise ConnectionResetError(int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005)
                        if opcode == websocket.ABNF.OPCODE_TEXT:
                            self.received.append(int(data))
                except websocket.WebSocketTimeoutException:
                    pass
                except (OSError, websocket.WebSocketException) as exc:
                    self.closes.append(exc.args[0] if isinstance(exc, ConnectionResetError) and exc.args else None)
                    ws.close(timeout=0.1)
                    self.at += 1
                    ws = self._ws = self._connect()
                    self.reconnects += 1
                if self.stop.is_set() and self.received and self.received[-1] == self.sent - 1:
                    return
        except BaseException as exc:
            self.error = exc
        finally:
            self._done.set()

    def cut(self) -> None:
        """Drop the connection without a Close, as a phone changing networks does."""
        self._ws.sock.shutdown(socket.SHUT_RDWR)

    def finish(self, timeout: float = 30.0) -> None:
        assert self._done.wait(timeout), f"client {self.client_id[:8]}: sent {self.sent}, echoes up to " \
                                         f"{self.received[-1:]} within {timeout} s"
        self._ws.close(timeout=1)
        if self.error is not None:
            raise self.error

    def first_deliveries(self) -> list[int]:
        seen, order = set(), []
        for n in self.received:
            if n not in seen:
                seen.add(n)
                order.append(n)
        return order


@pytest.fixture
def redis_server():
    needs(redis_server_missing(), "the fleet tests")
    server = RedisServer().start()
    yield server
    server.stop()


def fleet_proxy(processes, redis_server, tmp_path, backend, *args: str):
    """``iwsproxy serve`` in the fleet of ``redis_server``, with a handoff directory of its own."""
    handoff = tempfile.mkdtemp(dir=tmp_path, prefix="handoff-")
    return processes.proxy("--backend", backend.url, "--redis-url", redis_server.url(), "--handoff-dir", handoff,
                           "--resume-grace", "30", *args)


def test_sigterm_evacuates_a_streaming_client_that_resumes_on_another_process(processes, redis_server, tmp_path):
    backend = processes.echo()
    first = fleet_proxy(processes, redis_server, tmp_path, backend)
    second = fleet_proxy(processes, redis_server, tmp_path, backend)
    stop = threading.Event()
    client = FleetClient([first, second], 0.005, stop).start()
    wait_for(lambda: len(client.received) >= 50, what="the stream to run")
    first.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: client.reconnects >= 1, what="a resume")
    resumed_at = client.sent
    wait_for(lambda: len(client.received) >= resumed_at + 50, what="the stream to go on")
    stop.set()
    client.finish()
    order = client.first_deliveries()
    assert order == list(range(client.sent)), "every message echoed, in order"
    assert client.closes == [1012]
    assert first.proc.wait(10) == 0
    counters = second.admin("GET", path="/admin/status")[1]["counters"]
    assert counters.get("resumed_from_rest", 0) + counters.get("moved_in", 0) == 1
    assert stats(backend)["connections_total"] == 2
    print(f"\nevacuation: {client.sent} sent, {len(client.received) - len(order)} duplicates")


def check_streams(clients: list[FleetClient]) -> tuple[int, int]:
    """Every message of every client echoed, in order of first delivery; (sent, duplicates)."""
    sent = duplicates = 0
    for client in clients:
        order = client.first_deliveries()
        assert order == list(range(client.sent)), f"client {client.client_id[:8]}: lost or out of order"
        sent += client.sent
        duplicates += len(client.received) - len(order)
    return sent, duplicates


def test_three_processes_one_drained_mid_stream_lose_nothing(processes, redis_server, tmp_path):
    backend = processes.echo()
    proxies = [fleet_proxy(processes, redis_server, tmp_path, backend) for _ in range(3)]
    stop = threading.Event()
    clients = [FleetClient(proxies, 0.02, stop, first=n % 3).start() for n in range(30)]
    on_first = [client for client in clients if client.at == 0]
    wait_for(lambda: all(len(client.received) >= 20 for client in clients), what="every stream to run")
    proxies[0].proc.send_signal(signal.SIGTERM)
    wait_for(lambda: all(client.reconnects for client in on_first), what="the drained process's clients to resume")
    marks = {client: client.sent for client in clients}
    wait_for(lambda: all(len(client.received) >= marks[client] + 20 for client in clients), what="streams to go on")
    stop.set()
    for client in clients:
        client.finish()
    sent, duplicates = check_streams(clients)
    assert all(client.closes == [1012] for client in on_first)
    assert all(not client.closes for client in clients if client not in on_first)
    assert proxies[0].proc.wait(10) == 0
    counters = [proxy.admin("GET", path="/admin/status")[1]["counters"] for proxy in proxies[1:]]
    # taken at rest, or waited for while their holder was still saving them
    resumed = sum(c.get("resumed_from_rest", 0) + c.get("moved_in", 0) for c in counters)
    assert resumed == len(on_first) == 10
    print(f"\nfleet: 30 clients, {sent} messages, 0 lost, {duplicates} duplicates; "
          f"{len(on_first)} evacuated and resumed on the other two")


def test_a_client_cut_off_resumes_on_another_process_while_its_session_lives(processes, redis_server, tmp_path):
    backend = processes.echo()
    first = fleet_proxy(processes, redis_server, tmp_path, backend)
    second = fleet_proxy(processes, redis_server, tmp_path, backend)
    stop = threading.Event()
    client = FleetClient([first, second], 0.005, stop).start()
    wait_for(lambda: len(client.received) >= 50, what="the stream to run")
    client.cut()
    wait_for(lambda: client.reconnects >= 1, what="a resume")
    resumed_at = client.sent
    wait_for(lambda: len(client.received) >= resumed_at + 50, what="the stream to go on")
    assert first.pipes() == [] and [p["host"] for p in second.pipes()] == [f"127.0.0.1:{second.port}"]
    stop.set()
    client.finish()
    sent, duplicates = check_streams([client])
    assert client.closes == [None]
    assert second.admin("GET", path="/admin/status")[1]["counters"]["moved_in"] == 1
    assert first.admin("GET", path="/admin/status")[1]["counters"]["moved_out"] == 1
    assert stats(backend)["connections_total"] == 2
    print(f"\nmove: {sent} sent, 0 lost, {duplicates} duplicates")


# ---- bad cases ----

def raw_redis(redis_server):
    import redis
    return redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)


def snapshot_key(client_id: str) -> str:
    return f"iwsproxy:snap:{client_id}"


def evacuated(proxy, timeout: float = 15.0) -> float:
    """SIGTERM ``proxy`` and wait for it to exit 0; how long it took."""
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(timeout) == 0
    return time.monotonic() - started


class CloseWatcher:
    """Reads ``ws`` in a thread until its Close (answered, as a client does) or its end: ``code``."""

    def __init__(self, ws: websocket.WebSocket):
        self.code: int | None = None
        self._thread = threading.Thread(target=self._read, args=(ws,), daemon=True)
        self._thread.start()

    def _read(self, ws: websocket.WebSocket) -> None:
        ws.settimeout(30)
        try:
            while True:
                opcode, data = ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    return
        except (OSError, websocket.WebSocketException):
            return

    def wait(self, timeout: float = 10.0) -> int | None:
        self._thread.join(timeout)
        return self.code


def echoed(ws: websocket.WebSocket, text: str) -> bool:
    """Send ``text`` and read until its echo (a resumed session may first deliver again what its
    client had not acknowledged); False if something else ends the reading."""
    ws.send(text)
    for _ in range(10):
        if ws.recv() == text:
            return True
    return False


@pytest.mark.parametrize("failure", ["unreachable", "full"])
def test_redis_failing_during_evacuation_falls_back_to_1012_within_the_bound(processes, redis_server, tmp_path,
                                                                               failure):
    backend = processes.echo()
    proxy = fleet_proxy(processes, redis_server, tmp_path, backend, "--shutdown-timeout", "3")
    clients = [proxy.connect() for _ in range(3)]
    for ws in clients:
        assert echoed(ws, "hello")
    watchers = [CloseWatcher(ws) for ws in clients]
    if failure == "unreachable":
        redis_server.kill()
    else:
        raw_redis(redis_server).config_set("maxmemory-policy", "noeviction")
        raw_redis(redis_server).config_set("maxmemory", "1")  # every write refused: OOM
    took = evacuated(proxy)
    assert [watcher.wait() for watcher in watchers] == [1012] * 3
    assert took < 3 + 1.5, f"the shutdown took {took:.1f} s"
    log = proxy.stderr_text()
    if failure == "unreachable":
        assert "Redis is unreachable: 3 sessions close with 1012 and are lost" in log
    else:
        assert "evacuation: 3 sessions could not be saved" in log
        assert raw_redis(redis_server).keys("iwsproxy:snap:*") == []
    print(f"\nRedis {failure}: 3 sessions lost with 1012, shutdown in {took:.2f} s")


def test_the_evacuation_byte_cap_bounds_what_is_written_to_redis(processes, redis_server, tmp_path):
    backend = processes.echo()
    proxy = fleet_proxy(processes, redis_server, tmp_path, backend, "--evacuate-max-bytes", "3000")
    clients = [proxy.connect() for _ in range(3)]
    for ws in clients:
        assert echoed(ws, "x" * 500)
    evacuated(proxy)
    saved = raw_redis(redis_server).keys("iwsproxy:snap:*")
    assert 1 <= len(saved) < 3, "the cap lets some in, not all"
    total = sum(len(raw_redis(redis_server).lindex(key, 0)) for key in saved)
    assert total <= 3000
    assert f"evacuation: {3 - len(saved)} sessions could not be saved" in proxy.stderr_text()


def test_saved_state_is_bounded_by_the_per_client_caps(processes, redis_server, tmp_path):
    deaf = DeafBackend()
    limit, largest = 64 * 1024, 16 * 1024
    proxy = fleet_proxy(processes, redis_server, tmp_path, deaf, "--buffer-limit", str(limit),
                        "--max-message-size", str(largest), "--shutdown-timeout", "3")
    modest, greedy = proxy.connect(), proxy.connect()
    for _ in range(3):  # 48 KiB at a backend that reads nothing: held, unacknowledged
        modest.send_binary(b"m" * largest)
    greedy.settimeout(0.5)
    try:
        for _ in range(200):  # 3.2 MiB: the proxy holds the client back, the rest waits in the sockets
            greedy.send_binary(b"g" * largest)
    except (OSError, websocket.WebSocketException):
        pass
    wait_for(lambda: sum(p["buffered_bytes"] for p in proxy.pipes()) >= 3 * largest + limit // 2,
             what="both clients' messages held")
    watchers = [CloseWatcher(ws) for ws in (modest, greedy)]
    evacuated(proxy)
    assert [watcher.wait() for watcher in watchers] == [1012, 1012]
    bound = 2 * (limit + largest) + 8 * 1024  # each way: under half the cap takes one more message
    snapshot = raw_redis(redis_server).lindex(snapshot_key(modest.client_id), 0)
    assert 3 * largest < len(snapshot) <= bound, f"{len(snapshot)} bytes"
    # what the greedy client sent after the Close passes its cap: the session ends (1013), or is saved whole
    saved = raw_redis(redis_server).lindex(snapshot_key(greedy.client_id), 0) or b""
    assert len(saved) <= bound
    print(f"\ncapped: {len(snapshot)} bytes in Redis for 48 KiB held, {len(saved)} for a client that pushed "
          f"3.2 MiB (--buffer-limit {limit})")
    deaf.close()


def test_a_session_evacuated_twice_resumes_on_the_third_process(processes, redis_server, tmp_path):
    backend = processes.echo()
    proxies = [fleet_proxy(processes, redis_server, tmp_path, backend) for _ in range(3)]
    stop = threading.Event()
    client = FleetClient(proxies, 0.005, stop).start()
    for step in (1, 2):
        wait_for(lambda: len(client.received) >= 40 * step, what="the stream to run")
        proxies[step - 1].proc.send_signal(signal.SIGTERM)
        wait_for(lambda: client.reconnects >= step, what=f"resume number {step}")
    resumed_at = client.sent
    wait_for(lambda: len(client.received) >= resumed_at + 30, what="the stream to go on")
    assert len(proxies[2].pipes()) == 1
    stop.set()
    client.finish()
    check_streams([client])
    assert client.closes == [1012, 1012]


def test_a_session_resumed_on_two_processes_at_once_lives_on_exactly_one(processes, redis_server, tmp_path):
    backend = processes.echo()
    proxies = [fleet_proxy(processes, redis_server, tmp_path, backend) for _ in range(3)]
    ws = proxies[0].connect()
    assert echoed(ws, "before")
    watcher = CloseWatcher(ws)
    evacuated(proxies[0])
    assert watcher.wait() == 1012
    outcomes: dict[int, object] = {}
    go = threading.Barrier(2)

    def resume(n: int) -> None:
        go.wait()
        try:
            outcomes[n] = proxies[n].connect(ws.client_id)
        except websocket.WebSocketBadStatusException as exc:
            outcomes[n] = exc.status_code

    threads = [threading.Thread(target=resume, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    wait_for(lambda: sum(len(proxy.pipes()) for proxy in proxies[1:]) == 1, what="one session in the fleet")
    live = []
    for n, outcome in outcomes.items():
        if isinstance(outcome, int):
            assert outcome in (409, 503)
            continue
        outcome.settimeout(10)
        try:
            if echoed(outcome, f"on {n}"):
                live.append(n)
        except (OSError, websocket.WebSocketException):
            pass  # taken over (4409) by the other connection
    assert len(live) == 1, f"exactly one live connection, not {outcomes}"
    assert len(proxies[live[0]].pipes()) == 1


def test_an_evacuated_session_nobody_resumes_expires_with_the_grace(processes, redis_server, tmp_path):
    backend = processes.echo()
    first = fleet_proxy(processes, redis_server, tmp_path, backend, "--resume-grace", "1")
    second = fleet_proxy(processes, redis_server, tmp_path, backend, "--resume-grace", "1")
    ws = first.connect()
    assert echoed(ws, "hello")
    evacuated(first)
    key = snapshot_key(ws.client_id)
    assert 0 < raw_redis(redis_server).pttl(key) <= 1000
    wait_for(lambda: not raw_redis(redis_server).exists(key), timeout=5, what="the snapshot to expire")
    again = second.connect(ws.client_id)
    assert echoed(again, "a new session")
    counters = second.admin("GET", path="/admin/status")[1]["counters"]
    assert not counters.get("resumed_from_rest") and not counters.get("moved_in")


def test_a_forged_resume_on_another_process_is_refused(processes, redis_server, tmp_path):
    backend = processes.echo()
    secret = ("--resume-secret", "s3cret")
    first = fleet_proxy(processes, redis_server, tmp_path, backend, *secret)
    second = fleet_proxy(processes, redis_server, tmp_path, backend, *secret)
    ws, other = first.connect(), first.connect()
    assert echoed(ws, "hello")

    def status_of(client_id: str, token: str | None) -> int:
        try:
            second.connect(f"{client_id}?token={token}" if token else client_id).close()
            return 101
        except websocket.WebSocketBadStatusException as exc:
            return exc.status_code

    # held live by the first process: a forged resume neither moves nor ends it
    for token in (None, "forged", sign("s3cret", other.client_id)):
        assert status_of(ws.client_id, token) == 403
    assert echoed(ws, "still here") and len(first.pipes()) == 2
    evacuated(first)
    # at rest: refused the same way, and the snapshot stays
    for token in (None, "forged", sign("s3cret", other.client_id), sign("other secret", ws.client_id)):
        assert status_of(ws.client_id, token) == 403
    assert raw_redis(redis_server).llen(snapshot_key(ws.client_id)) == 1
    again = second.connect(f"{ws.client_id}?token={sign('s3cret', ws.client_id)}")
    assert echoed(again, "resumed")
    assert second.admin("GET", path="/admin/status")[1]["counters"]["resumed_from_rest"] == 1


def test_a_draining_process_answers_healthz_503_and_shows_where_sessions_are_held(processes, redis_server,
                                                                                  tmp_path):
    deaf = DeafBackend()  # no Close reply: the evacuation waits for it, so the draining can be seen
    proxy = fleet_proxy(processes, redis_server, tmp_path, deaf, "--advertise-address", "proxy-a.internal:8080",
                        "--shutdown-timeout", "4")
    ws = proxy.connect()
    wait_for(lambda: proxy.pipes(), what="the pipe")
    assert proxy.pipes()[0]["host"] == "proxy-a.internal:8080"
    assert proxy.get_json("/healthz")["status"] == "ok"
    watcher = CloseWatcher(ws)
    proxy.proc.send_signal(signal.SIGTERM)

    def health() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(proxy.http_url + "/healthz", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = wait_for(lambda: (answer := health())[0] == 503 and answer, what="/healthz to say draining")
    assert body["status"] == "draining"
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        proxy.connect()
    assert refused.value.status_code == 503
    assert watcher.wait() == 1012
    assert proxy.proc.wait(10) == 0
    assert raw_redis(redis_server).exists(snapshot_key(ws.client_id))
    deaf.close()
