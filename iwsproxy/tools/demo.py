"""``iwsproxy demo``: two echo backends, the proxy, a stream, a SIGKILL, nothing lost.

Everything runs on 127.0.0.1 in child processes; the demo is its own client.
"""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid

import websocket

from .process import ChildProcess

__all__ = ["run_demo"]

TOKEN = "demo-token"


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _serving_backend(proxy: ChildProcess) -> str | None:
    req = urllib.request.Request(proxy.http_url + "/admin/backends", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        pipes = json.loads(resp.read())["pipes"]
    return pipes[0]["backend"] if pipes else None


def run_demo(messages: int = 200, interval_s: float = 0.01) -> int:
    """Stream ``messages`` numbered messages, SIGKILL the serving backend halfway, check every echo."""
    backends = [ChildProcess("iwsproxy.tools.echo", "--port", "0", "--name", name, name=name)
                for name in ("alpha", "beta")]
    proxy = None
    try:
        for backend in backends:
            backend.start()
            _say(f"echo backend {backend.name} listening on {backend.url}")
        proxy = ChildProcess("iwsproxy", "serve", "--bind", "127.0.0.1:0", "--admin-token", TOKEN,
                             "--log-level", "warning", *[a for b in backends for a in ("--backend", b.url)],
                             name="proxy").start()
        client_url = proxy.url_for(str(uuid.uuid4()))
        _say(f"proxy listening on {proxy.url}; client connects to {client_url}")
        ws = websocket.create_connection(client_url, timeout=10)
        first = _serving_backend(proxy)
        victim = next(b for b in backends if b.url == first)
        _say(f"the client's session is served by {victim.name}")

        received: list[str] = []
        done = threading.Event()
        reader_error: list[BaseException] = []

        def read() -> None:
            try:
                seen = set()
                while len(seen) < messages:
                    text = ws.recv()
                    received.append(text)
                    seen.add(text)
            except BaseException as exc:  # reported below
                reader_error.append(exc)
            finally:
                done.set()

        reader = threading.Thread(target=read, name="demo-reader", daemon=True)
        reader.start()
        kill_at = messages // 2
        for i in range(messages):
            if i == kill_at:
                victim.kill()
                _say(f"message {i}: SIGKILLed {victim.name} mid-stream")
            ws.send(f"{i}")
            if done.wait(interval_s):  # paces the stream; returns early only if the reader stopped
                break
        done.wait(30)
        if reader_error:
            _say(f"FAILED: the client lost its connection: {reader_error[0]!r}")
            return 1
        now_serving = _serving_backend(proxy)
        survivor = next((b.name for b in backends if b.url == now_serving), now_serving)
        first_seen: list[int] = []
        seen: set[int] = set()
        for text in received:
            n = int(text)
            if n not in seen:
                seen.add(n)
                first_seen.append(n)
        duplicates = len(received) - len(first_seen)
        lost = messages - len(seen)
        in_order = first_seen == sorted(first_seen)
        _say(f"the stream continued on {survivor}; the client was never disconnected")
        _say(f"sent {messages}, echoed {len(seen)} distinct, lost {lost}, duplicates {duplicates}, "
             f"order {'kept' if in_order else 'BROKEN'}")
        ws.close()
        ok = lost == 0 and in_order and survivor != victim.name
        _say("OK: nothing lost" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for child in [proxy, *backends]:
            if child is not None:
                child.terminate()
