"""Sessions that outlive a proxy process: adopted from a snapshot, evacuated, resumed anywhere."""

from __future__ import annotations

import signal
import socket
import tempfile
import threading
import time
import uuid

import pytest
import websocket
from gevent import socket as gsocket

from conftest import needs, stats, wait_for
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
    assert first.pipes() == [] and len(second.pipes()) == 1
    stop.set()
    client.finish()
    sent, duplicates = check_streams([client])
    assert client.closes == [None]
    assert second.admin("GET", path="/admin/status")[1]["counters"]["moved_in"] == 1
    assert first.admin("GET", path="/admin/status")[1]["counters"]["moved_out"] == 1
    assert stats(backend)["connections_total"] == 2
    print(f"\nmove: {sent} sent, 0 lost, {duplicates} duplicates")
