"""Restart without a disconnect: SIGHUP hands the listening socket and every pipe to a successor.

Real proxies (``iwsproxy serve``) and echo backends in child processes, real clients; the
successor is a grandchild of the test, found by the pid in /healthz and killed at teardown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import os
import signal
import socket
import ssl
import threading
import urllib.request
import uuid

import pytest
import websocket

from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_TEXT, encode_frame
from tests.conftest import ROOT, wait_for
from tests.integration.rawws import RawClient, RecordingBackend

pytestmark = pytest.mark.timeout(120)


def health(proxy) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(proxy.http_url + "/healthz", timeout=5) as response:
        return json.loads(response.read())


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class Generations:
    """The processes that served one proxy port, oldest first; SIGHUP the current one and wait
    for its successor to answer /healthz and for it to exit."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.pids = [health(proxy)["pid"]]

    @property
    def current(self) -> int:
        return self.pids[-1]

    def restart(self, timeout: float = 30.0) -> int:
        old = self.current
        os.kill(old, signal.SIGHUP)
        new = wait_for(lambda: (pid := health(self.proxy)["pid"]) != old and pid, timeout, "a successor")
        self.pids.append(new)
        wait_for(lambda: _gone(old), timeout, f"process {old} to exit")
        return new

    def stop(self) -> None:
        for pid in self.pids[1:]:
            if not _gone(pid):
                os.kill(pid, signal.SIGTERM)
        for pid in self.pids[1:]:
            try:
                wait_for(lambda: _gone(pid), 10, f"process {pid} to exit")
            except AssertionError:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def generations():
    made = []

    def make(proxy) -> Generations:
        g = Generations(proxy)
        made.append(g)
        return g

    yield make
    for g in made:
        g.stop()


class BothWays:
    """A client streaming numbers, even ones as text and odd ones as binary, and recording every
    echo in order; at the end a marker is sent and awaited, so that all before it has come back."""

    def __init__(self, url: str, interval_s: float, stop: threading.Event):
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.interval_s, self.stop = interval_s, stop
        self.sent = 0
        self.received: list[tuple[int, int]] = []
        self.error: BaseException | None = None
        self.closed_with = None
        self.done = threading.Event()
        self._threads = [threading.Thread(target=self._send_loop, daemon=True),
                         threading.Thread(target=self._read_loop, daemon=True)]
        for t in self._threads:
            t.start()

    def _send_loop(self) -> None:
        try:
            while not self.stop.wait(self.interval_s):
                n = self.sent
                if n % 2:
                    self.ws.send_binary(n.to_bytes(4, "big"))
                else:
                    self.ws.send(str(n))
                self.sent += 1
            self.ws.send("end")
        except BaseException as exc:
            self.error = self.error or exc

    def _read_loop(self) -> None:
        try:
            while True:
                opcode, data = self.ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.closed_with = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    return
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    if data == b"end":
                        self.done.set()
                        return
                    self.received.append((OP_TEXT, int(data)))
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    self.received.append((OP_BINARY, int.from_bytes(data, "big")))
        except BaseException as exc:
            self.error = self.error or exc
        finally:
            self.done.set()

    def check(self) -> None:
        assert self.error is None, repr(self.error)
        assert self.closed_with is None
        expected = [(OP_BINARY if n % 2 else OP_TEXT, n) for n in range(self.sent)]
        assert self.received == expected, (len(self.received), self.sent)

    def close(self) -> None:
        self.ws.close(timeout=1)


def test_three_sighups_fifty_clients_streaming_both_ways(processes, generations):
    backends = [processes.echo(name=f"echo{i}") for i in range(2)]
    proxy = processes.proxy(*[a for b in backends for a in ("--backend", b.url)], "--delivery", "at-least-once")
    gens = generations(proxy)
    stop = threading.Event()
    clients = [BothWays(proxy.url_for(str(uuid.uuid4())), 0.02, stop) for _ in range(50)]
    try:
        wait_for(lambda: all(c.sent >= 5 for c in clients), 20, "every client streaming")
        accepted = [b.stats()["connections_total"] for b in backends]
        assert sum(accepted) == 50
        for _ in range(3):
            before = min(len(c.received) for c in clients)
            gens.restart()
            # every client still gets echoes after the move
            wait_for(lambda: min(len(c.received) for c in clients) > before + 3, 20, "echoes after the move")
        stop.set()
        for c in clients:
            assert c.done.wait(30)
        for c in clients:
            c.check()
        assert [b.stats()["connections_total"] for b in backends] == accepted  # no new backend connection
        assert len(set(gens.pids)) == 4
        status = proxy.admin("GET", path="/admin/status")[1]
        assert status["counters"]["pipes_moved_in"] == 50
        metrics = urllib.request.urlopen(proxy.http_url + "/metrics", timeout=5).read().decode()
        assert 'iwsproxy_handover_events_total{event="pipes_moved_in"} 50.0' in metrics
    finally:
        stop.set()
        for c in clients:
            c.close()


def test_new_clients_are_accepted_throughout(processes, generations):
    """Connections opened while the handover runs are served (by either process), none refused."""
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    gens = generations(proxy)
    held = [proxy.connect() for _ in range(20)]
    results: list = []
    done = threading.Event()

    def connect_loop():
        while not done.is_set():
            try:
                ws = proxy.connect(timeout=20)
                ws.send("x")
                results.append(ws.recv() == "x")
                ws.close(timeout=1)
            except Exception as exc:  # reported by the test
                results.append(exc)

    thread = threading.Thread(target=connect_loop, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(results) >= 3, 20, "connections before")
        gens.restart()
        count = len(results)
        wait_for(lambda: len(results) >= count + 3, 20, "connections after")
    finally:
        done.set()
        thread.join(30)
    assert all(r is True for r in results), [r for r in results if r is not True][:3]
    for ws in held:
        ws.send("still")
        assert ws.recv() == "still"


def test_detached_session_is_resumable_after_the_move(processes, generations):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, "--resume-grace", "30")
    gens = generations(proxy)
    ws = proxy.connect()
    ws.send("one")
    assert ws.recv() == "one"
    ws.sock.shutdown(socket.SHUT_RDWR)  # gone without a Close: detached
    ws.sock.close()
    wait_for(lambda: proxy.pipes()[0]["state"] == "detached", 10, "detached")
    gens.restart()
    assert proxy.pipes()[0]["state"] == "detached"
    again = proxy.connect(ws.client_id)
    again.send("two")
    got = [again.recv()]
    if got == ["one"]:  # not acknowledged before the client vanished: replayed on resume, as without a move
        got.append(again.recv())
    assert got[-1] == "two"
    assert backend.stats()["connections_total"] == 1
    again.close()


def test_waiting_for_a_backend_buffers_across_the_move(processes, generations):
    """Its backend killed and none left: the pipe buffers; after the move the successor connects
    the backend added then, and flushes what was held."""
    first = processes.echo()
    proxy = processes.proxy("--backend", first.url, "--reconnect-deadline", "60")
    gens = generations(proxy)
    raw = RawClient(proxy.port)
    assert raw.handshake() == 101
    first.kill()
    wait_for(lambda: proxy.pipes()[0]["backend_state"] == "failing_over", 10, "failing over")
    raw.send(encode_frame(OP_TEXT, b"held", mask_source=_mask()))
    wait_for(lambda: proxy.pipes()[0]["buffered_bytes"] == 4, 10, "buffered")
    gens.restart()
    assert proxy.pipes()[0]["buffered_bytes"] == 4
    backend = processes.echo()
    proxy.admin("POST", {"url": backend.url})
    assert raw.data_events() == [(OP_TEXT, b"held")]
    raw.close()


def _mask():
    from iwsproxy.frames import MaskSource
    return MaskSource()


def test_partial_frame_from_the_client_moves_with_its_connection(processes, generations):
    """Part of a frame sent before the SIGHUP, the rest after: the successor completes it."""
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    gens = generations(proxy)
    raw = RawClient(proxy.port)
    assert raw.handshake() == 101
    frame = encode_frame(OP_BINARY, bytes(range(200)), mask_source=_mask())
    raw.send(frame[:50])
    gens.restart()
    raw.send(frame[50:])
    assert raw.data_events() == [(OP_BINARY, bytes(range(200)))]
    raw.close()


def _backend_connection(backend: RecordingBackend, proxy) -> socket.socket:
    raw = RawClient(proxy.port)
    assert raw.handshake() == 101
    backend.requests.get(timeout=10)
    return raw, backend.connections[-1]


def test_partial_frame_from_the_backend_moves_with_its_connection(processes, generations):
    backend = RecordingBackend()
    try:
        proxy = processes.proxy("--backend", backend.url)
        gens = generations(proxy)
        raw, conn = _backend_connection(backend, proxy)
        frame = encode_frame(OP_TEXT, "é".encode() * 100)  # unmasked: from the server side
        conn.sendall(frame[:51])  # half a character, too
        gens.restart()
        conn.sendall(frame[51:])
        assert raw.data_events() == [(OP_TEXT, "é".encode() * 100)]
        raw.close()
    finally:
        backend.close()


def test_draining_pipe_moves_and_finishes_its_drain_in_the_successor(processes, generations):
    """The pipe has sent its backend a Close (drain) and waits for the reply when it moves: the
    reply reaches the successor, which moves the pipe to the next backend with nothing lost."""
    first = RecordingBackend()
    try:
        proxy = processes.proxy("--backend", first.url, "--drain-window", "0")
        gens = generations(proxy)
        raw, conn = _backend_connection(first, proxy)
        second = processes.echo()
        assert proxy.admin("POST", {"url": second.url})[0] in (200, 201)
        assert proxy.admin("DELETE", {"url": first.url, "drain": True})[0] == 202
        wait_for(lambda: proxy.pipes()[0]["backend_state"] == "draining", 10, "draining")
        raw.send(encode_frame(OP_TEXT, b"during", mask_source=_mask()))
        wait_for(lambda: proxy.pipes()[0]["buffered_bytes"] == 6, 10, "held while draining")
        gens.restart()
        assert proxy.pipes()[0]["backend_state"] == "draining"
        conn.sendall(encode_frame(OP_CLOSE, (1001).to_bytes(2, "big")))  # the Close reply
        assert raw.data_events() == [(OP_TEXT, b"during")]
        assert second.stats()["connections_total"] == 1
        raw.close()
    finally:
        first.close()


def test_pipe_in_a_close_handshake_finishes_it_in_the_old_process(processes, generations):
    """A session that is ending is not moved: the old process completes its close handshake
    (and exits once it has) while the successor serves everything else."""
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    gens = generations(proxy)
    other = proxy.connect()
    raw = RawClient(proxy.port)
    assert raw.handshake() == 101
    raw.send(encode_frame(OP_CLOSE, (1000).to_bytes(2, "big"), mask_source=_mask()))
    assert raw.close_code() == 1000  # the proxy's reply; the client does not close its end yet
    gens.restart()
    assert raw.at_eof()
    other.send("x")
    assert other.recv() == "x"
    other.close()


def test_second_sighup_during_a_handover_starts_no_second_successor(processes, generations):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    gens = generations(proxy)
    ws = proxy.connect()
    old = gens.current
    os.kill(old, signal.SIGHUP)
    # a successor takes about a second to start: the second SIGHUP comes while the first is handled
    wait_for(lambda: "restart: starting a successor" in proxy.stderr_text(), 10, "the handover started")
    os.kill(old, signal.SIGHUP)
    new = wait_for(lambda: (pid := health(proxy)["pid"]) != old and pid, 30, "a successor")
    gens.pids.append(new)
    wait_for(lambda: _gone(old), 30, "the old process to exit")
    ws.send("x")
    assert ws.recv() == "x"
    assert "SIGHUP ignored, a handover is under way" in proxy.stderr_text()
    assert proxy.stderr_text().count("restart: starting a successor") == 1
    ws.close()


def _shadowed(tmp_path) -> dict:
    """An environment whose PYTHONPATH has ``tmp_path``: a ``sitecustomize.py`` the test writes
    there runs in every process started later with this environment (a successor too)."""
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}


def test_successor_that_fails_to_import_leaves_the_old_process_serving(processes, generations, tmp_path):
    """A broken upgrade (the package no longer imports): the successor exits, the old process
    says why and serves on; a later SIGHUP, after a fix, succeeds."""
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, env=_shadowed(tmp_path))
    gens = generations(proxy)
    ws = proxy.connect()
    # from now on a process started with this environment cannot import iwsproxy.cli
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['iwsproxy.cli'] = None\n")
    os.kill(gens.current, signal.SIGHUP)
    wait_for(lambda: "restart failed, serving on" in proxy.stderr_text(), 30, "the failure logged")
    assert "did not take over" in proxy.stderr_text() and "exited with status 1" in proxy.stderr_text()
    assert health(proxy)["pid"] == gens.current
    ws.send("x")
    assert ws.recv() == "x"
    status = proxy.admin("GET", path="/admin/status")[1]
    assert status["counters"]["handovers_failed"] == 1
    (tmp_path / "sitecustomize.py").unlink()
    gens.restart()
    ws.send("y")
    assert ws.recv() == "y"
    ws.close()


def test_a_state_version_the_successor_cannot_read_is_refused_and_closed_with_1012(processes, generations,
                                                                                   tmp_path):
    """The old process writes snapshots of a version the successor does not know (a downgrade):
    the successor refuses each pipe, the old one closes them with 1012, and the client's next
    connection is served by the successor."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "if not os.environ.get('IWSPROXY_HANDOVER_FD'):  # the first process writes a newer version\n"
        "    import iwsproxy.snapshot\n"
        "    iwsproxy.snapshot.VERSION = 99\n")
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, env=_shadowed(tmp_path))
    gens = generations(proxy)
    raw = RawClient(proxy.port)
    assert raw.handshake() == 101
    raw.send(encode_frame(OP_TEXT, b"x", mask_source=_mask()))
    assert raw.data_events() == [(OP_TEXT, b"x")]
    gens.restart()
    assert raw.close_code() == 1012
    raw.close()
    assert "unknown snapshot version 99" in proxy.stderr_text()
    again = proxy.connect()
    again.send("y")
    assert again.recv() == "y"
    status = proxy.admin("GET", path="/admin/status")[1]
    assert status["counters"]["pipes_refused"] == 1
    again.close()


def test_successor_killed_mid_handover(processes, generations, tmp_path):
    """The successor dies after taking two pipes, while it builds the third: those two are lost
    as in a crash, every other pipe (the third included) stays with the old process, which
    serves on and accepts again."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('IWSPROXY_HANDOVER_FD'):\n"
        "    import iwsproxy.io.manager as m\n"
        "    adopt, calls = m.PipeManager.adopt_moved, []\n"
        "    def dying(self, state, fds):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            os._exit(9)\n"
        "        return adopt(self, state, fds)\n"
        "    m.PipeManager.adopt_moved = dying\n")
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, env=_shadowed(tmp_path))
    gens = generations(proxy)
    clients = [proxy.connect() for _ in range(6)]
    os.kill(gens.current, signal.SIGHUP)
    wait_for(lambda: "restart failed, serving on" in proxy.stderr_text(), 30, "the failure logged")
    assert health(proxy)["pid"] == gens.current
    alive = 0
    for ws in clients:
        try:
            ws.send("x")
            alive += ws.recv() == "x"
        except (websocket.WebSocketException, OSError):
            pass
    assert alive == 4
    fresh = proxy.connect()
    fresh.send("y")
    assert fresh.recv() == "y"


# ---- the channel and its peer check (socket pairs in this process) ----

def test_channel_carries_bytes_and_descriptors_in_order():
    from iwsproxy.io.handover import Channel

    left, right = socket.socketpair()
    a, b = socket.socketpair()
    try:
        sender, receiver = Channel(left), Channel(right)
        def send():  # more than the socket pair holds: the receiver reads meanwhile
            sender.send({"op": "pipe", "state": {"snapshot": b"\x00" * 300_000, "nested": [b"x", 1]}}, [a.fileno()])
            sender.send({"op": "done"})

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        header, fds = receiver.receive()
        assert header["state"] == {"snapshot": b"\x00" * 300_000, "nested": [b"x", 1]} and len(fds) == 1
        with socket.socket(fileno=fds[0]) as moved:
            moved.sendall(b"ping")
            assert b.recv(4) == b"ping"
        assert receiver.receive() == ({"op": "done"}, [])
        thread.join(10)
    finally:
        for s in (left, right, a, b):
            s.close()


def test_peer_check_names_the_process_and_user():
    from iwsproxy.io.handover import HandoverError, check_peer, peer_credentials

    left, right = socket.socketpair()
    try:
        assert peer_credentials(left)[:2] == (os.getpid(), os.getuid())
        check_peer(left, os.getpid())
        with pytest.raises(HandoverError):
            check_peer(left, os.getpid() + 1)
    finally:
        left.close()
        right.close()


def test_wss_backend_is_reconnected_by_the_successor_like_a_failover(processes, generations, tmp_path):
    """A TLS backend connection cannot move: the successor connects the backend again, replays
    what it had not acknowledged, and the streaming client loses nothing, doubles nothing."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    backend = processes.echo("--certfile", str(cert), "--keyfile", str(key))
    proxy = processes.proxy("--backend", backend.url.replace("ws://", "wss://"), "--backend-ca-bundle", str(cert),
                            "--delivery", "at-least-once")
    gens = generations(proxy)
    stop = threading.Event()
    clients = [BothWays(proxy.url_for(str(uuid.uuid4())), 0.02, stop) for _ in range(5)]
    try:
        wait_for(lambda: all(c.sent >= 5 for c in clients), 20, "every client streaming")
        before = min(len(c.received) for c in clients)
        gens.restart()
        wait_for(lambda: min(len(c.received) for c in clients) > before + 3, 20, "echoes after the move")
        stop.set()
        for c in clients:
            assert c.done.wait(30)
        for c in clients:
            c.check()
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{backend.port}/stats", context=context, timeout=5) as r:
            assert json.loads(r.read())["connections_total"] == 10  # each reconnected once, by the successor
        assert "could not move to this process (TLS)" in proxy.stderr_text()
    finally:
        stop.set()
        for c in clients:
            c.close()
