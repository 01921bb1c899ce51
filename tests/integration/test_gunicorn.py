"""Both documented gunicorn commands get the same behaviour as ``iwsproxy serve``: the proxy's own
worker class (``-k iwsproxy.gunicorn.Worker``) and geventwebsocket's stock one."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid

import pytest
import websocket

from conftest import ADMIN_TOKEN, ROOT, Proxy, recv_close, stats, wait_for
from iwsproxy.io.server import GC_YOUNG_THRESHOLD
from iwsproxy.tools.process import ChildProcess


OUR_WORKER = "iwsproxy.gunicorn.Worker"
STOCK_WORKER = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"
WORKERS = pytest.mark.parametrize("worker_class", [OUR_WORKER, STOCK_WORKER], ids=["ours", "stock"])


class Gunicorn(Proxy):
    def __init__(self, *backends: str, workers: int = 2, args: tuple[str, ...] = (), worker_class: str = OUR_WORKER):
        ChildProcess.__init__(
            self, "gunicorn", "-k", worker_class, "-w", str(workers),
            "-b", "127.0.0.1:0", "-c", "python:iwsproxy.gunicorn_conf", *args, "wsgi:app",
            env={"IWSPROXY_BACKENDS": ",".join(backends),
                 "IWSPROXY_ADMIN_TOKEN": ADMIN_TOKEN}, name="gunicorn")


@WORKERS
def test_gunicorn_worker_command(processes, worker_class):
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    server = processes.add(Gunicorn(a.url, b.url, worker_class=worker_class))
    # refusals are real HTTP statuses, so the worker runs the proxy's own handler
    with pytest.raises(websocket.WebSocketBadStatusException) as bad:
        websocket.create_connection(server.url_for("not-a-uuid"), timeout=5)
    assert bad.value.status_code == 400
    with pytest.raises(urllib.error.HTTPError) as plain:
        urllib.request.urlopen(server.http_url + "/" + str(uuid.uuid4()), timeout=5)
    assert plain.value.code == 426
    ws = server.connect()
    for i in range(20):
        ws.send(f"m{i}")
        assert ws.recv() == f"m{i}"
    wait_for(lambda: stats(a)["connections_open"] + stats(b)["connections_open"] >= 1, what="a backend connection")
    victim = a if stats(a)["connections_open"] else b
    victim.kill()
    for i in range(20, 40):
        ws.send(f"m{i}")
        assert ws.recv() == f"m{i}"
    ws.close()
    assert server.admin("GET", path="/admin/status")[1]["gc"]["threshold"][0] == GC_YOUNG_THRESHOLD  # wsgi.py tuned it


@WORKERS
def test_sigterm_to_gunicorn_closes_clients_with_1012_and_exits_promptly(processes, worker_class):
    backend = processes.echo()
    # one worker: once it has answered, it has installed its signal handlers (a worker still
    # booting when SIGTERM arrives would make the master wait out the graceful timeout)
    server = processes.add(Gunicorn(backend.url, workers=1, worker_class=worker_class))
    clients = [server.connect() for _ in range(6)]
    for ws in clients:
        ws.send("x")
        assert ws.recv() == "x"
    _sigterm_closes_every_client_with_1012_and_exits_promptly(server, clients)


def test_our_worker_serves_an_app_of_its_own_and_stops_it_gracefully(processes):
    """An app that mounts the extension itself (tests/legacy_app.py): the worker finds its manager."""
    backend = processes.echo()
    server = processes.add(ChildProcess(
        "gunicorn", "-k", OUR_WORKER, "-w", "1", "-b", "127.0.0.1:0", "-c", "python:iwsproxy.gunicorn_conf",
        "legacy_app:app", env={"PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}, name="legacy"))
    req = urllib.request.Request(server.http_url + "/deploy/backends", data=json.dumps({"url": backend.url}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    assert urllib.request.urlopen(req, timeout=5).status == 201
    with pytest.raises(websocket.WebSocketBadStatusException) as bad:
        websocket.create_connection(server.url_for("/ws/not-a-uuid"), timeout=5)
    assert bad.value.status_code == 400
    clients = [websocket.create_connection(server.url_for(f"/ws/{uuid.uuid4()}"), timeout=5) for _ in range(3)]
    for ws in clients:
        ws.send("x")
        assert ws.recv() == "x"
    _sigterm_closes_every_client_with_1012_and_exits_promptly(server, clients)


def test_outside_a_gunicorn_worker_the_app_changes_no_worker_and_no_signal_handler():
    from flask import Flask
    from geventwebsocket.gunicorn.workers import GeventWebSocketWorker
    from geventwebsocket.handler import WebSocketHandler

    from iwsproxy import IWSProxy, Settings
    before = signal.getsignal(signal.SIGTERM)
    IWSProxy(Flask("outside"), settings=Settings())
    assert signal.getsignal(signal.SIGTERM) is before
    assert GeventWebSocketWorker.wsgi_handler is WebSocketHandler


def _sigterm_closes_every_client_with_1012_and_exits_promptly(server, clients) -> None:
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for ws in clients:
        assert recv_close(ws)[0] == 1012
    assert server.proc.wait(15) == 0
    # well before gunicorn's graceful timeout (10 s), which is how long it would otherwise hang on
    assert time.monotonic() - started < 6


def _workers(master: int) -> set[int]:
    with open(f"/proc/{master}/task/{master}/children") as f:
        return {int(pid) for pid in f.read().split()}


def test_hup_with_a_handoff_dir_moves_every_pipe_to_the_new_workers(processes, tmp_path):
    """gunicorn's HUP starts new workers, then stops the old ones: each hands its pipes to a new
    one through the handoff directory (connections and sessions as they are): the streaming
    clients lose nothing, get nothing twice, and the backend sees no new connection."""
    from test_handover import BothWays

    backend = processes.echo()
    handoff = tmp_path / "handoff"
    handoff.mkdir(mode=0o700)
    server = Gunicorn(backend.url, workers=2)
    server.env["IWSPROXY_HANDOFF_DIR"] = str(handoff)
    processes.add(server)
    master = server.proc.pid
    old = wait_for(lambda: len(w := _workers(master)) == 2 and w, 20, "two workers")
    stop = __import__("threading").Event()
    clients = [BothWays(server.url_for(str(uuid.uuid4())), 0.02, stop) for _ in range(10)]
    try:
        wait_for(lambda: all(c.sent >= 5 for c in clients), 20, "every client streaming")
        accepted = stats(backend)["connections_total"]
        os.kill(master, signal.SIGHUP)
        wait_for(lambda: not (_workers(master) & old) and len(_workers(master)) == 2, 60, "the old workers gone")
        before = min(len(c.received) for c in clients)
        wait_for(lambda: min(len(c.received) for c in clients) > before + 3, 20, "echoes after the move")
        stop.set()
        for c in clients:
            assert c.done.wait(30)
        for c in clients:
            c.check()
        assert stats(backend)["connections_total"] == accepted == 10
    finally:
        stop.set()
        for c in clients:
            c.close()
