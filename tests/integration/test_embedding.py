"""iwsproxy mounted into an existing Flask app, served by the documented gunicorn worker."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.cookiejar import CookieJar

import pytest
import websocket

from conftest import ROOT, recv_close, stats, wait_for
from rawws import DeafBackend, FakeBackend
from iwsproxy.tools.process import ChildProcess


class LegacyApp(ChildProcess):
    def __init__(self, module: str = "legacy_app", env: dict | None = None):
        super().__init__("gunicorn", "-k", "geventwebsocket.gunicorn.workers.GeventWebSocketWorker", "-w", "1",
                         "-b", "127.0.0.1:0", "-c", "python:iwsproxy.gunicorn_conf", f"{module}:app",
                         env={"PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), **(env or {})},
                         name=module)


def test_extension_in_a_legacy_app(processes):
    backend = processes.echo()
    app = processes.add(LegacyApp())
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    assert opener.open(app.http_url + "/", timeout=5).read() == b"legacy home"
    assert json.loads(opener.open(app.http_url + "/login", data=b"user=ada", timeout=5).read()) == {"user": "ada"}
    assert json.loads(opener.open(app.http_url + "/me", timeout=5).read()) == {"user": "ada"}
    # the app's own route registers a backend through IWSProxy.manager()
    req = urllib.request.Request(app.http_url + "/deploy/backends", data=json.dumps({"url": backend.url}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    assert urllib.request.urlopen(req, timeout=5).status == 201
    # the proxy lives under /ws, its admin under /ops; the app's session cookie reaches the backend
    session_cookie = "session=from-the-legacy-app"
    ws = websocket.create_connection(f"{app.url}/ws/{uuid.uuid4()}", timeout=5, cookie=session_cookie)
    ws.send("through the legacy app")
    assert ws.recv() == "through the legacy app"
    assert stats(backend)["last_headers"]["cookie"] == session_cookie
    listing = urllib.request.Request(app.http_url + "/ops/backends",
                                     headers={"Authorization": "Bearer legacy-token"})
    assert json.loads(urllib.request.urlopen(listing, timeout=5).read())["backends"][0]["url"] == backend.url
    status = urllib.request.Request(app.http_url + "/ops/status", headers={"Authorization": "Bearer legacy-token"})
    threshold = json.loads(urllib.request.urlopen(status, timeout=5).read())["gc"]["threshold"]
    assert threshold == list(gc.get_threshold())  # CPython's defaults: the embedding app's own choice
    with pytest.raises(urllib.error.HTTPError) as plain:
        urllib.request.urlopen(f"{app.http_url}/ws/{uuid.uuid4()}", timeout=5)
    assert plain.value.code == 426
    ws.close()


def test_registering_the_extension_twice_is_an_error():
    from flask import Flask

    from iwsproxy import IWSProxy, Settings
    app = Flask("twice")
    IWSProxy(app, settings=Settings())
    with pytest.raises(RuntimeError, match="already registered"):
        IWSProxy(app, settings=Settings())


def test_sigterm_closes_clients_with_1012_and_exits(processes):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url)
    clients = [proxy.connect() for _ in range(5)]
    for ws in clients:
        ws.send("x")
        assert ws.recv() == "x"
    proxy.proc.send_signal(signal.SIGTERM)
    for ws in clients:
        assert recv_close(ws)[0] == 1012
    assert proxy.proc.wait(10) == 0
    assert stats(backend)["connections_open"] == 0


def test_sigterm_does_not_wait_on_a_pipe_whose_first_backend_failed(processes):
    deaf = FakeBackend()  # accepts TCP, never answers the handshake
    try:
        proxy = processes.proxy("--backend", deaf.url, "--connect-timeout", "2")
        refused: dict = {}

        def connect():
            try:
                proxy.connect(timeout=10)
            except websocket.WebSocketBadStatusException as exc:
                refused["status"] = exc.status_code
        opener = threading.Thread(target=connect, daemon=True)
        opener.start()
        wait_for(lambda: deaf.connections, what="the pipe's handshake with the backend under way")
        proxy.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert proxy.proc.wait(10) == 0
        # the handshake fails after 2 s and the pipe is given up; a shutdown that waited for it to
        # close would take its whole timeout
        assert time.monotonic() - signalled < 4.5
        opener.join(5)
        assert refused == {"status": 503}
    finally:
        deaf.close()


class _Answering(FakeBackend):
    """A server on 127.0.0.1 that reads a request, then sends ``answer`` and closes (b"": closes at once)."""

    def __init__(self, answer: bytes):
        self.answer = answer
        super().__init__()
        self.admin_url = self.url.replace("ws://", "http://") + "/admin"

    def _serve(self, conn):
        with conn:
            conn.recv(65536)
            conn.sendall(self.answer)


def test_backends_cli_errors_are_one_clear_line():
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "iwsproxy", "backends", *args, "--token", "x"],
                              capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": ROOT})
    html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>"
    servers = {"no answer from the admin API": _Answering(b""), "check --admin": _Answering(html)}
    try:
        for expected, server in servers.items():
            result = cli("list", "--admin", server.admin_url)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert expected in result.stderr
        result = cli("add", "ws://127.0.0.1:9/x", "--drain", "--admin", "http://127.0.0.1:9/admin")
        assert result.returncode == 1 and "--drain goes with backends remove" in result.stderr
    finally:
        for server in servers.values():
            server.close()


def test_backends_cli(processes):
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    proxy = processes.proxy("--backend", a.url)

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "iwsproxy", "backends", *args, "--admin",
                                 proxy.http_url + "/admin", "--token", "test-admin-token"],
                                capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": ROOT})
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert a.url in cli("list")
    cli("add", b.url)
    assert b.url in cli("list")
    ws = proxy.connect()
    served_by = proxy.pipes()[0]["backend"]
    out = json.loads(cli("remove", served_by, "--drain"))
    assert out["draining"] is True and out["pipes"] == 1
    ws.send("after the drain")
    assert ws.recv() == "after the drain"
    assert served_by not in cli("list")
    bad = subprocess.run([sys.executable, "-m", "iwsproxy", "backends", "list", "--admin",
                          proxy.http_url + "/admin", "--token", "wrong"], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PYTHONPATH": ROOT})
    assert bad.returncode != 0 and "401" in bad.stderr
    ws.close()


def test_a_custom_client_id_extractor(processes):
    backend = processes.echo()
    app = processes.add(LegacyApp("custom_id_app", env={"IWSPROXY_BACKENDS": backend.url}))
    ws = websocket.create_connection(f"{app.url}/user-42", timeout=5)
    ws.send("custom id")
    assert ws.recv() == "custom id"
    assert stats(backend)["last_headers"]["x-iwsproxy-client-id"] == "user-42"
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"{app.url}/{uuid.uuid4()}", timeout=5)
    assert refused.value.status_code == 400
    ws.close()


def test_served_with_the_stock_handler_the_client_gets_a_clear_1011(processes):
    server = processes.add(ChildProcess("stock_handler_server",
                                        env={"PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])},
                                        name="stock"))
    ws = websocket.create_connection(f"{server.url}/{uuid.uuid4()}", timeout=5)  # the stock handler said 101
    assert recv_close(ws) == (1011, "server misconfigured")


def test_a_crashed_supervisor_closes_its_client_with_1011_and_gives_back_its_buffer(processes):
    deaf = DeafBackend()
    try:
        app = processes.add(LegacyApp("faulty_app", env={"IWSPROXY_BACKENDS": deaf.url}))
        admin = {"Authorization": "Bearer faulty-token", "Content-Type": "application/json"}

        def call(path: str, method: str = "GET", body: dict | None = None) -> dict:
            data = json.dumps(body).encode() if body is not None else b"" if method != "GET" else None
            request = urllib.request.Request(app.http_url + path, data=data, headers=admin, method=method)
            with urllib.request.urlopen(request, timeout=5) as response:
                raw = response.read()
            return json.loads(raw) if raw else {}

        client_id = str(uuid.uuid4())
        ws = websocket.create_connection(f"{app.url}/{client_id}", timeout=10)
        ws.send("x" * 1000)  # held in the replay window: the deaf backend never acknowledges it
        wait_for(lambda: call("/admin/status")["buffered_bytes"] == 1000, what="the message to be held")
        call(f"/fault/{client_id}", "POST")
        call("/admin/backends", "DELETE", {"url": deaf.url, "drain": True})  # an event: the supervisor runs
        assert recv_close(ws) == (1011, "internal error")
        wait_for(lambda: call("/admin/status")["pipes"] == 0, what="the pipe to end")
        assert call("/admin/status")["buffered_bytes"] == 0
    finally:
        deaf.close()
