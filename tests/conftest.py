"""Shared fixtures: echo backends and proxies in child processes, real clients, 127.0.0.1 only.

The suite runs its files in parallel (pytest-xdist; pytest.ini's ``-n 2 --dist loadfile``): each
file whole in one worker process, its tests in order. A test may share state with the tests of
its own file (module fixtures, ``shared``), and with nothing else: ports are 0 (a port found free
is taken by someone else as soon as it is let go), files go under ``tmp_path``, and nothing changes
``os.environ``, the working directory or another module. ``-n 0`` runs everything in one process.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
import websocket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from iwsproxy.tools.echo import EchoProcess  # noqa: E402
from iwsproxy.tools.process import ChildProcess  # noqa: E402

ADMIN_TOKEN = "test-admin-token"


class Proxy(ChildProcess):
    """``python -m iwsproxy serve`` on 127.0.0.1:0 with an admin token."""

    def __init__(self, *args: str, env: dict | None = None, admin_token: str | None = ADMIN_TOKEN):
        token = ("--admin-token", admin_token) if admin_token else ()
        super().__init__("iwsproxy", "serve", "--bind", "127.0.0.1:0", *token, *args,
                         env=env, name="proxy")

    def connect(self, client_id: str | None = None, *, timeout: float = 10, **kwargs) -> websocket.WebSocket:
        client_id = client_id or str(uuid.uuid4())
        ws = websocket.create_connection(self.url_for(client_id), timeout=timeout, **kwargs)
        ws.client_id = client_id
        return ws

    def admin(self, method: str, body: dict | None = None, token: str | None = ADMIN_TOKEN,
              path: str = "/admin/backends") -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.http_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, {"text": raw.decode(errors="replace")}

    def backends(self) -> dict[str, dict]:
        status, body = self.admin("GET")
        assert status == 200, body
        return {b["url"]: b for b in body["backends"]}

    def pipes(self) -> list[dict]:
        return self.admin("GET")[1]["pipes"]


def echo_process(*args: str, name: str = "echo") -> EchoProcess:
    return EchoProcess(*args, name=name)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Wait for a condition observable only in another process (its HTTP API), with backoff.

    Used where no event crosses the process boundary; every other wait in the
    suite blocks on a socket or an event with a timeout.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)  # ok-sleep: backoff between looks at another process's HTTP state (bounded)
        delay = min(delay * 2, 0.2)


def needs(missing: str | None, what: str) -> None:
    """Skip when something the test needs is not installed, except in CI, where that is a failure."""
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run {what}: {missing}")
        pytest.skip(missing)


def recv_close(ws: websocket.WebSocket) -> tuple[int, str]:
    """Read until the Close frame; return its (code, reason)."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
            return code, data[2:].decode("utf-8", "replace")


@pytest.fixture
def processes():
    """Start child processes through this list; all are killed at teardown (and checked dead)."""
    started: list[ChildProcess] = []

    class Starter:
        def echo(self, *args: str, name: str = "echo") -> EchoProcess:
            proc = echo_process(*args, name=name)
            started.append(proc)
            return proc.start()

        def proxy(self, *args: str, env: dict | None = None, admin_token: str | None = ADMIN_TOKEN) -> Proxy:
            proc = Proxy(*args, env=env, admin_token=admin_token)
            started.append(proc)
            return proc.start()

        def add(self, proc: ChildProcess) -> ChildProcess:
            started.append(proc)
            return proc.start()

    yield Starter()
    # The clients a test dropped are garbage in reference cycles (websocket-client's are): collected
    # now, their sockets close, so a proxy's graceful stop below has no Close reply to wait for.
    gc.collect()
    for proc in reversed(started):
        proc.terminate(timeout=5)
        assert not proc.alive


class _Shared:
    """Child processes started at the first request for them, by what they are started with, and
    shared by the later requests for the same (see the ``shared`` fixture)."""

    def __init__(self) -> None:
        self.started: dict[tuple, ChildProcess] = {}

    def echo(self, *args: str, name: str = "echo") -> EchoProcess:
        return self.add(echo_process(*args, name=name))

    def proxy(self, *args: str, env: dict | None = None, admin_token: str | None = ADMIN_TOKEN) -> Proxy:
        return self.add(Proxy(*args, env=env, admin_token=admin_token))

    def add(self, proc: ChildProcess) -> ChildProcess:
        """``proc`` started, or the one started before with the same module, arguments, environment
        and name (``proc`` is then dropped unstarted)."""
        key = (proc.module, tuple(proc.args), tuple(sorted(proc.env.items())), proc.name)
        started = self.started.get(key)
        if started is None:
            started = self.started[key] = proc.start()
        assert started.alive, f"the shared {started.name} died (a test using it must not stop it)"
        return started


@pytest.fixture(scope="module")
def shared():
    """Like ``processes``, but each process is started once for the test module, by the first test
    asking for one started with the same arguments, and shared by the later ones. A test using it
    leaves the processes as it found them (kills nothing, changes no pool or setting, closes its
    clients) and asserts nothing that the module's other tests also change (the pipe list, the
    counters, a backend's connection count): use ``processes`` for that. Killed after the module,
    and checked dead."""
    starter = _Shared()
    yield starter
    gc.collect()  # as in ``processes``: the clients' sockets close before the graceful stops
    for proc in reversed(list(starter.started.values())):
        proc.terminate(timeout=5)
        assert not proc.alive


def stats(backend: EchoProcess) -> dict:
    return backend.stats()
