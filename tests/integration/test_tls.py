"""TLS: wss:// backends (verified by default; a CA bundle setting trusts a private CA), and clients
of a gunicorn that terminates TLS itself."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import websocket

from conftest import recv_close, stats
from test_gunicorn import Gunicorn


@pytest.fixture
def certificate(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


def burst_arrives_whole(ws, count: int = 300) -> None:
    """Many messages sent back to back (several frames per read, some messages spanning TLS
    records) all come back, in order."""
    sent = [(f"{n}:" + "x" * (n * 97 % 40000)) for n in range(count)]
    for message in sent:
        ws.send(message)
    assert [ws.recv() for _ in sent] == sent


def test_wss_backend_verification(processes, certificate):
    cert, key = certificate
    backend = processes.echo("--certfile", str(cert), "--keyfile", str(key))
    url = backend.url.replace("ws://", "wss://")
    untrusting = processes.proxy("--backend", url)
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        untrusting.connect()
    assert refused.value.status_code == 503            # self-signed: not trusted by default
    trusting = processes.proxy("--backend", url, "--backend-ca-bundle", str(cert))
    ws = trusting.connect()
    ws.send("over tls")
    assert ws.recv() == "over tls"
    burst_arrives_whole(ws)
    ws.close()
    unverified = processes.proxy("--backend", url, env={"IWSPROXY_BACKEND_TLS_VERIFY": "false"})
    ws = unverified.connect()
    ws.send("unverified")
    assert ws.recv() == "unverified"
    ws.close()


def test_gunicorn_terminating_tls_serves_pipes(processes, certificate):
    """A TLS socket cannot be detached from its server: its request lasts as long as the pipe."""
    cert, key = certificate
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    server = processes.add(Gunicorn(a.url, b.url, workers=1, args=("--certfile", str(cert), "--keyfile", str(key))))
    url = server.url.replace("ws://", "wss://") + "/6f1c1c1e-8d4b-4b6e-9a55-3f1d2b0c9a02"
    ws = websocket.create_connection(url, timeout=10, sslopt={"ca_certs": str(cert)})
    ws.send("over tls")
    assert ws.recv() == "over tls"
    burst_arrives_whole(ws)
    serving = a if stats(a)["messages_total"] else b
    serving.kill()  # failover works behind a TLS client edge too
    ws.send("after failover")
    assert ws.recv() == "after failover"
    ws.send_close(1000, b"bye")
    assert recv_close(ws) == (1000, "bye")  # the proxy completes the close handshake
    ws.close()
