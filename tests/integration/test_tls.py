"""wss:// backends: certificates are verified by default; a CA bundle setting trusts a private CA."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import websocket


@pytest.fixture
def certificate(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


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
    ws.close()
    unverified = processes.proxy("--backend", url, env={"IWSPROXY_BACKEND_TLS_VERIFY": "false"})
    ws = unverified.connect()
    ws.send("unverified")
    assert ws.recv() == "unverified"
    ws.close()
