"""In front of an existing service, unchanged clients: python-websockets on both sides of the proxy.

The backends are python-websockets' own server (``tests/websockets_backend.py``: it reports the
request target it got, then echoes); the clients are python-websockets' sync client.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from websockets.sync.client import connect

from iwsproxy.process import ChildProcess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def websockets_backend(processes, name: str = "websockets") -> ChildProcess:
    env = {"PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    return processes.add(ChildProcess("websockets_backend", name, env=env, name=name))


def hello(url: str, **kwargs) -> dict:
    """Connect, read the backend's report of the request it got, check one echo, close."""
    with connect(url, open_timeout=10, close_timeout=5, **kwargs) as ws:
        report = json.loads(ws.recv(timeout=10))
        ws.send("ping")
        assert ws.recv(timeout=10) == "ping"
    return report


@pytest.mark.timeout(60)
def test_a_backend_url_without_a_path_gets_the_clients_path_and_query(processes):
    backend = websockets_backend(processes)
    proxy = processes.proxy("--backend", backend.url)  # ws://127.0.0.1:PORT: no path
    client_id = str(uuid.uuid4())
    report = hello(proxy.url_for(f"/chat/{client_id}?room=7&name=%C3%A9+x"))
    # the id is the path's last segment; the rest of the path and the query arrive as sent
    assert report["path"] == "/chat?room=7&name=%C3%A9+x"
    assert report["client_id"] == client_id
    assert hello(proxy.url_for(f"/{client_id}?room=7"))["path"] == "/?room=7"
    assert hello(proxy.url_for(f"/{client_id}"))["path"] == "/"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suffix, expected", [("/ws?k=1", "/ws?k=1&room=7"), ("/", "/?room=7"),
                                              ("/socket", "/socket?room=7")])
def test_a_backend_url_with_a_path_keeps_it(processes, suffix, expected):
    backend = websockets_backend(processes)
    proxy = processes.proxy("--backend", backend.url + suffix)
    assert hello(proxy.url_for(f"/chat/{uuid.uuid4()}?room=7"))["path"] == expected
