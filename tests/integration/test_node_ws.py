"""In front of an existing service, unchanged clients: Node's `ws` package on both sides of the proxy.

The backend is a `ws` server (tests/node/backend.js: it reports the request target it got, then
echoes); the client is a `ws` client with a reconnect-on-close loop and its id in the query
(tests/node/client.js, driven line by line over stdin/stdout). Neither knows about the proxy.
`npm ci` in tests/node installs `ws` (.ci/run does).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import uuid

import pytest

from conftest import needs
from iwsproxy.tools.process import ChildProcess

NODE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "node")


def node_missing() -> str | None:
    """Why the Node tests cannot run here, or None if they can."""
    if shutil.which("node") is None:
        return "node is not installed (apt-get install nodejs npm; .ci/run installs it)"
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")):
        return "the ws package is not installed: run `npm ci` in tests/node (.ci/run does)"
    return None


@pytest.fixture(autouse=True)
def _node():
    needs(node_missing(), "the Node ws tests")


class NodeBackend(ChildProcess):
    """``node tests/node/backend.js NAME``: announces its port as the Python children do."""

    def __init__(self, name: str):
        super().__init__("backend.js", name, name=name)

    def command(self) -> list[str]:
        return ["node", os.path.join(NODE_DIR, self.module), *self.args]


class NodeClient:
    """``node tests/node/client.js URL``: its events (JSON lines) go to a queue read with timeouts."""

    def __init__(self, url: str):
        self.proc = subprocess.Popen(["node", os.path.join(NODE_DIR, "client.js"), url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.events: queue.Queue = queue.Queue()
        self._held: list[dict] = []  # messages passed over by next(), read first by echoes()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exited"})

    def command(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _get(self, timeout: float) -> dict:
        try:
            got = self._held.pop(0) if self._held else self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the Node client reported nothing within {timeout} s") from None
        assert got["event"] in ("message", "close", "open"), got
        return got

    def next(self, event: str, timeout: float = 10.0) -> dict:
        """The next event named ``event``; messages before it are kept for :meth:`echoes`, errors
        fail the test."""
        skipped: list[dict] = []
        try:
            while True:
                got = self._get(timeout)
                if got["event"] == event:
                    return got
                if got["event"] == "message":
                    skipped.append(got)
        finally:
            self._held[:0] = skipped

    def report(self) -> dict:
        """The backend's first message on a new backend connection (see backend.js)."""
        return json.loads(self.next("message")["data"])

    def echoes(self, count: int, timeout: float = 10.0, *, earlier=()) -> tuple[list[str], list[dict], list[dict]]:
        """The next ``count`` distinct echoes (at-least-once: one may come twice, and those of
        ``earlier`` messages not yet acknowledged when a backend died come again: they are not
        counted), the backend reports among them, and the client's own close and open events."""
        earlier = set(earlier)
        seen: list[str] = []
        reports: list[dict] = []
        others: list[dict] = []
        while len(dict.fromkeys(seen)) < count:
            got = self._get(timeout)
            if got["event"] != "message":
                others.append(got)
            elif got["data"].startswith("{"):
                reports.append(json.loads(got["data"]))
            elif got["data"] not in earlier:
                seen.append(got["data"])
        return list(dict.fromkeys(seen)), reports, others

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.command("quit")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdin.close()
        self._reader.join(timeout=5)
        self.proc.stdout.close()


@pytest.fixture
def node_clients():
    started: list[NodeClient] = []

    def start(url: str) -> NodeClient:
        client = NodeClient(url)
        started.append(client)
        return client

    yield start
    for client in started:
        client.stop()
    assert all(client.proc.returncode is not None for client in started)


def routed_proxy(processes):
    """Two Node backends per route (/chat and /news), the id taken from the query's ``sid``."""
    chat = [processes.add(NodeBackend(f"chat{n}")) for n in (1, 2)]
    news = processes.add(NodeBackend("news"))
    proxy = processes.proxy("--route", f"/chat={chat[0].url},{chat[1].url}", "--route", f"/news={news.url}",
                            "--client-id-from", "query:sid")
    return proxy, chat, news


@pytest.mark.timeout(60)
def test_path_and_query_arrive_unchanged_and_routes_pick_the_pool(processes, node_clients):
    proxy, chat, news = routed_proxy(processes)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    targets = [f"/chat/room/7?sid={ids[0]}&name=%C3%A9+x", f"/news?lang=fr&sid={ids[1]}", f"/chat?sid={ids[2]}"]
    clients = [node_clients(proxy.url_for(target)) for target in targets]
    reports = [client.report() for client in clients]
    assert [r["path"] for r in reports] == targets  # the id stays in the query the backend sees
    assert [r["client_id"] for r in reports] == ids
    assert [r["name"][:4] for r in reports] == ["chat", "news", "chat"]
    for n, client in enumerate(clients):
        client.command(f"send hello {n}")
        assert client.echoes(1) == ([f"hello {n}"], [], [])
    assert sorted(p["pool"] for p in proxy.pipes()) == ["/chat", "/chat", "/news"]


@pytest.mark.timeout(60)
def test_a_backend_sigkill_loses_nothing(processes, node_clients):
    proxy, chat, _ = routed_proxy(processes)
    client_id = str(uuid.uuid4())
    target = f"/chat?sid={client_id}&room=7"
    client = node_clients(proxy.url_for(target))
    first = client.report()
    for n in range(1, 6):
        client.command(f"send {n}")
    assert client.echoes(5) == ([str(n) for n in range(1, 6)], [], [])
    victim = next(b for b in chat if b.name == first["name"])
    victim.kill()
    for n in range(6, 21):
        client.command(f"send {n}")
    echoes, reports, others = client.echoes(15, earlier=[str(n) for n in range(1, 6)])
    assert echoes == [str(n) for n in range(6, 21)]  # nothing lost, in order
    assert others == []  # the client never noticed: no close, no reconnect
    # the other backend of the route took over, and got the same path and query
    assert [(r["name"], r["path"], r["client_id"]) for r in reports] == [
        (next(b.name for b in chat if b is not victim), target, client_id)]
    assert [p["failovers"] for p in proxy.pipes()] == [1]


@pytest.mark.timeout(60)
def test_a_connection_cut_without_a_close_resumes_the_same_session(processes, node_clients):
    proxy, _, _ = routed_proxy(processes)
    client_id = str(uuid.uuid4())
    client = node_clients(proxy.url_for(f"/news?sid={client_id}"))
    assert client.next("open")["count"] == 1
    assert client.report()["client_id"] == client_id
    for n in range(1, 6):
        client.command(f"send {n}")
    assert client.echoes(5) == ([str(n) for n in range(1, 6)], [], [])
    for n in range(6, 11):
        client.command(f"send {n}")
    client.command("cut")  # once 6..10 have left: their echoes may be lost on the way back
    assert client.next("close")["code"] == 1006
    for n in range(11, 16):
        client.command(f"send {n}")  # while reconnecting: the client sends them once connected
    assert client.next("open")["count"] == 2
    echoes, reports, others = client.echoes(15 - 5, timeout=15, earlier=[str(n) for n in range(1, 6)])
    assert echoes == [str(n) for n in range(6, 16)]  # nothing lost, in order
    assert reports == [] and others == []  # the same backend connection carried on: no new report
    counters = proxy.admin("GET", path="/admin/status")[1]["counters"]
    assert counters.get("clients_resumed", 0) + counters.get("clients_takeover", 0) == 1, counters
    assert len(proxy.pipes()) == 1
