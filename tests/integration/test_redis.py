"""The shared backend registry (IWSPROXY_REDIS_URL): every gunicorn worker and every host sees one pool.

A real redis-server runs for the module (tests/redis_server.py); each test uses its
own database number, so their keys and channels stay apart.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time

import pytest
import websocket

from conftest import ADMIN_TOKEN, Proxy, needs, stats, wait_for
from iwsproxy.tools.echo import EchoProcess
from iwsproxy.tools.process import ChildProcess
from redis_server import RedisServer, redis_server_missing

WORKERS = 3
U, V = "ws://127.0.0.1:9/u", "ws://127.0.0.1:9/v"  # the backends of tests/registry_scenarios.py
SCENARIOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "registry_scenarios.py")


@pytest.fixture(scope="module")
def redis_server():
    needs(redis_server_missing(), "the Redis tests")
    server = RedisServer().start()
    yield server
    server.stop()


class Gunicorn(Proxy):
    """The documented gunicorn command with ``workers`` gevent-websocket workers sharing a Redis registry."""

    def __init__(self, redis_url: str, *, workers: int = WORKERS):
        ChildProcess.__init__(
            self, "gunicorn", "-k", "geventwebsocket.gunicorn.workers.GeventWebSocketWorker", "-w", str(workers),
            "-b", "127.0.0.1:0", "-c", "python:iwsproxy.gunicorn_conf", "wsgi:app",
            env={"IWSPROXY_REDIS_URL": redis_url, "IWSPROXY_ADMIN_TOKEN": ADMIN_TOKEN}, name="gunicorn")


# ---- talking to one given gunicorn worker ----
def _children(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(entry))
    return kids


def _owner(server_port: int, client_port: int, pids: set[int]) -> int | None:
    """The pid whose socket is the server end of 127.0.0.1:client_port -> :server_port."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    inodes = {row[9] for row in rows
              if int(row[1].split(":")[1], 16) == server_port and int(row[2].split(":")[1], 16) == client_port}
    targets = {f"socket:[{inode}]" for inode in inodes}
    for pid in pids:
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if links & targets:
            return pid
    return None


class WorkerChannel:
    """A kept-alive HTTP connection that one gunicorn worker accepted: its admin API, that worker's view."""

    def __init__(self, conn: http.client.HTTPConnection, pid: int):
        self.conn, self.pid = conn, pid

    def admin(self, method: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        self.conn.request(method, "/admin/backends", body=json.dumps(body) if body is not None else None,
                          headers=headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")

    def backends(self) -> set[str]:
        status, body = self.admin("GET")
        assert status == 200, body
        return {b["url"] for b in body["backends"]}

    def pipes(self) -> list[dict]:
        return self.admin("GET")[1]["pipes"]


def worker_channels(server: Gunicorn, workers: int = WORKERS, attempts: int = 60) -> dict[int, WorkerChannel]:
    """One kept-alive admin connection to each worker (connections land where the kernel puts them)."""
    pids = _children(server.proc.pid)
    assert len(pids) == workers, pids
    channels: dict[int, WorkerChannel] = {}
    for _ in range(attempts):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/healthz")
        conn.getresponse().read()  # answered, so accepted by some worker
        pid = _owner(server.port, conn.sock.getsockname()[1], pids)
        if pid is None or pid in channels:
            conn.close()
        else:
            channels[pid] = WorkerChannel(conn, pid)
        if len(channels) == workers:
            return channels
    raise AssertionError(f"{attempts} connections reached only workers {sorted(channels)} of {sorted(pids)}")


@pytest.fixture
def channels():
    opened: list[dict[int, WorkerChannel]] = []

    def open_to(server: Gunicorn) -> dict[int, WorkerChannel]:
        opened.append(worker_channels(server))
        return opened[-1]

    yield open_to
    for chans in opened:
        for channel in chans.values():
            channel.conn.close()


def roundtrip(ws: websocket.WebSocket, text: str) -> None:
    ws.send(text)
    assert ws.recv() == text


def refused_status(proxy: Proxy) -> int | None:
    """The HTTP status a new client gets, None if it is let in."""
    try:
        ws = proxy.connect(timeout=5)
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code
    ws.close()
    return None


def test_one_admin_call_reaches_every_worker_and_host(processes, redis_server, channels):
    redis_url = redis_server.url(1)
    echo = processes.echo(name="a")
    server = processes.add(Gunicorn(redis_url))
    other = processes.proxy("--redis-url", redis_url)
    workers = channels(server)
    views = lambda: [w.backends() for w in workers.values()] + [set(other.backends())]  # noqa: E731
    assert views() == [set()] * (WORKERS + 1)

    status, body = server.admin("POST", {"url": echo.url})
    posted = time.monotonic()
    assert (status, body["added"]) == (201, True)
    wait_for(lambda: all(echo.url in view for view in views()), timeout=1.0,
             what="the new backend in every worker and in the other process")
    print(f"\nregistration seen by {WORKERS} workers and the other process "
          f"{(time.monotonic() - posted) * 1000:.1f} ms after the POST returned")
    assert redis_server.client(1).zrange("iwsproxy:backends", 0, -1) == [echo.url]

    clients = []
    for i in range(30):  # each succeeds only if the worker that accepted it knows the backend
        ws = server.connect()
        roundtrip(ws, f"g{i}")
        clients.append(ws)
    while any(not w.pipes() for w in workers.values()) and len(clients) < 60:
        ws = server.connect()
        roundtrip(ws, "more")
        clients.append(ws)
    assert all(w.pipes() for w in workers.values()), "some worker served no client"
    for i in range(5):
        ws = other.connect()
        roundtrip(ws, f"o{i}")
        clients.append(ws)
    wait_for(lambda: stats(echo)["connections_open"] == len(clients), what="every client on the backend")
    for ws in clients:
        ws.close()

    status, _ = server.admin("DELETE", {"url": echo.url})
    removed = time.monotonic()
    assert status == 200
    wait_for(lambda: not any(echo.url in view for view in views()), timeout=1.0,
             what="the backend gone from every worker and the other process")
    print(f"removal seen everywhere {(time.monotonic() - removed) * 1000:.1f} ms after the DELETE returned")
    assert [refused_status(server) for _ in range(2 * WORKERS)] == [503] * (2 * WORKERS)
    assert refused_status(other) == 503
    assert redis_server.client(1).zrange("iwsproxy:backends", 0, -1) == []


def _while_redis_is_down(server: Gunicorn, workers: dict[int, WorkerChannel], a: EchoProcess,
                         b: EchoProcess) -> None:
    for i in range(2 * WORKERS):  # the last known pool keeps serving
        ws = server.connect()
        roundtrip(ws, f"down{i}")
        ws.close()
    # an admin call while Redis is down works in the process that answers it, and only there
    first, *rest = workers.values()
    status, body = first.admin("POST", {"url": b.url})
    assert (status, body["added"]) == (201, True)
    assert first.backends() == {a.url, b.url}
    assert all(w.backends() == {a.url} for w in rest)


def test_workers_keep_their_pool_while_redis_restarts(processes, redis_server, channels):
    redis_url = redis_server.url(2)
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    c = processes.echo(name="c")
    server = processes.add(Gunicorn(redis_url))
    other = processes.proxy("--redis-url", redis_url)
    workers = channels(server)
    assert other.admin("POST", {"url": a.url})[0] == 201
    wait_for(lambda: all(w.backends() == {a.url} for w in workers.values()), timeout=1.0,
             what="the backend in every worker")

    redis_server.kill()
    try:
        _while_redis_is_down(server, workers, a, b)
    finally:
        if not redis_server.running:  # the next test needs it
            redis_server.start()  # same port, empty: it lost everything
    assert other.admin("POST", {"url": c.url})[0] == 201
    # reconnect, re-subscribe, re-seed the lost set, write the change kept while down
    wait_for(lambda: all(w.backends() == {a.url, b.url, c.url} for w in workers.values())
             and set(other.backends()) == {a.url, b.url, c.url}, timeout=15.0,
             what="every process to reconnect and agree on a, b and c")
    assert set(redis_server.client(2).zrange("iwsproxy:backends", 0, -1)) == {a.url, b.url, c.url}
    clients = [server.connect() for _ in range(3 * WORKERS)] + [other.connect() for _ in range(3)]
    for i, ws in enumerate(clients):
        roundtrip(ws, f"up{i}")
    wait_for(lambda: min(stats(x)["connections_open"] for x in (a, b, c)) >= 1,
             what="clients spread over all three backends")
    for ws in clients:
        ws.close()


def test_drain_through_the_registry_moves_pipes_in_every_process(processes, redis_server):
    redis_url = redis_server.url(3)
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    one = processes.proxy("--redis-url", redis_url)
    two = processes.proxy("--redis-url", redis_url)
    assert one.admin("POST", {"url": a.url})[0] == 201
    wait_for(lambda: a.url in two.backends(), timeout=1.0, what="a in the second process")
    assert two.admin("POST", {"url": b.url})[0] == 201
    wait_for(lambda: b.url in one.backends(), timeout=1.0, what="b in the first process")
    assert list(one.backends()) == list(two.backends()) == [a.url, b.url]

    ws_one, ws_two = one.connect(), two.connect()  # round robin: the first pipe of each goes to a
    for i in range(5):
        roundtrip(ws_one, f"one{i}")
        roundtrip(ws_two, f"two{i}")
    assert [p["backend"] for p in one.pipes() + two.pipes()] == [a.url, a.url]

    status, body = one.admin("DELETE", {"url": a.url, "drain": True, "window_s": 0.2})
    assert (status, body["pipes"]) == (202, 1)
    assert redis_server.client(3).zrange("iwsproxy:backends", 0, -1) == [b.url]
    for i in range(5, 10):  # traffic while the pipes move: nothing lost, order kept
        ws_one.send(f"one{i}")
        ws_two.send(f"two{i}")
    for i in range(5, 10):
        assert ws_one.recv() == f"one{i}"
        assert ws_two.recv() == f"two{i}"
    wait_for(lambda: [p["backend"] for p in one.pipes() + two.pipes()] == [b.url, b.url],
             what="both pipes moved to b")
    wait_for(lambda: list(one.backends()) == list(two.backends()) == [b.url],
             what="a gone from both pools")
    assert [p["failovers"] for p in one.pipes() + two.pipes()] == [1, 1]
    assert stats(a)["connections_open"] == 0
    for i in range(10, 15):
        roundtrip(ws_one, f"one{i}")
        roundtrip(ws_two, f"two{i}")
    ws_one.close()
    ws_two.close()


def scenario(redis_url: str, name: str) -> dict:
    """Run one scenario of tests/registry_scenarios.py (two registries in one gevent process)."""
    done = subprocess.run([sys.executable, SCENARIOS, redis_url, name], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("op", ["drain", "remove"])
def test_an_own_change_wins_over_an_older_add_read_after_it(redis_server, op):
    # the worker applies its drain (remove) before publishing it; its own add, published
    # before, is read only after that and must not bring the backend back
    db = {"drain": 4, "remove": 5}[op]
    assert scenario(redis_server.url(db), f"own-{op}") == {"a": [], "b": [], "redis": []}


def test_a_change_redis_rejects_is_dropped_not_retried_forever(redis_server):
    # the drain is undone in that worker when it reconciles with Redis, which never lost U
    assert scenario(redis_server.url(6), "rejected-drain") == {"a": [U, V], "b": [U, V], "redis": [U, V]}


def test_a_drain_undone_here_by_an_add_made_after_it_is_not_applied_again(redis_server):
    # A's own add came after its drain: the drain's echo must not move the pipes off again
    assert scenario(redis_server.url(8), "drain-then-add-back") == {
        "a": [U], "b": [U], "drains_applied_in_a": 1, "redis": [U]}


def test_a_change_refused_for_want_of_memory_is_kept_and_written_later(redis_server):
    assert scenario(redis_server.url(9), "oom-add") == {"a": [U], "b": [U], "redis": [U]}


def test_a_worker_without_backends_leaves_a_new_registry_to_be_seeded(processes, redis_server):
    redis_url = redis_server.url(10)
    a, b = "ws://127.0.0.1:9/a", "ws://127.0.0.1:9/b"
    bare = processes.proxy("--redis-url", redis_url)  # an admin instance, say: nothing to seed
    seeding = processes.proxy("--redis-url", redis_url, "--backend", a)
    assert list(seeding.backends()) == [a]
    wait_for(lambda: a in bare.backends(), timeout=5, what="the seed published to the running process")
    # a FLUSHALL closes no connection: the running processes learn of the new seed from its publication
    redis_server.client(10).flushdb()
    reseeding = processes.proxy("--redis-url", redis_url, "--backend", b)
    wait_for(lambda: b in bare.backends() and b in seeding.backends(), timeout=5, what="the new seed everywhere")
    assert list(reseeding.backends()) == [b]
    assert redis_server.client(10).zrange("iwsproxy:backends", 0, -1) == [b]


def test_backends_given_at_start_only_seed_a_new_registry(processes, redis_server):
    redis_url = redis_server.url(7)
    a, b, c = "ws://127.0.0.1:9/a", "ws://127.0.0.1:9/b", "ws://127.0.0.1:9/c"
    given = ("--redis-url", redis_url, "--backend", a, "--backend", b)
    first = processes.proxy(*given)
    assert redis_server.client(7).zrange("iwsproxy:backends", 0, -1) == [a, b]
    assert first.admin("DELETE", {"url": a})[0] == 200
    # a worker (re)started with the same settings, as gunicorn respawns one, takes the registry as it is
    again = processes.proxy(*given)
    assert list(again.backends()) == [b]
    assert again.admin("POST", {"url": c})[0] == 201  # published after anything its start could have sent
    wait_for(lambda: c in first.backends(), timeout=1.0, what="c in the first process")
    assert list(first.backends()) == list(again.backends()) == [b, c]
    assert redis_server.client(7).zrange("iwsproxy:backends", 0, -1) == [b, c]
