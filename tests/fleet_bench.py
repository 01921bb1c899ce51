"""Evacuation benchmark, by hand: ``python tests/fleet_bench.py [SESSIONS]`` (default 5,000).

One echo backend, one real Redis, one ``iwsproxy serve`` in its fleet. SESSIONS idle clients
connect (each exchanges one message, then waits, answering pings and the proxy's Close); the
proxy is SIGTERMed; the script reports how long the process took to empty and exit, the Redis
memory the sessions took, and how many clients got 1012. Prints one line of results.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from iwsproxy.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameParser, MaskSource, encode_frame  # noqa: E402
from iwsproxy.tools.echo import EchoProcess  # noqa: E402
from iwsproxy.tools.loadgen import Target, open_websocket  # noqa: E402
from iwsproxy.tools.process import ChildProcess  # noqa: E402
from redis_server import RedisServer  # noqa: E402


def main(sessions: int) -> None:
    redis_server = RedisServer().start()
    backend = EchoProcess().start()
    handoff = os.path.join(redis_server._dir.name, "handoff")
    os.mkdir(handoff)
    proxy = ChildProcess("iwsproxy", "serve", "--bind", "127.0.0.1:0", "--backend", backend.url, "--redis-url",
                         redis_server.url(), "--handoff-dir", handoff, "--max-pipes", str(sessions + 10),
                         "--shutdown-timeout", "60", name="proxy").start()
    redis = redis_server.client()
    masks = MaskSource()
    selector = selectors.DefaultSelector()
    closes: dict[int, int] = {}
    try:
        base_memory = redis.info("memory")["used_memory"]
        started = time.monotonic()
        for n in range(sessions):
            sock, rest = open_websocket(Target("127.0.0.1", proxy.port, f"/{uuid.uuid4()}"))
            sock.sendall(encode_frame(OP_TEXT, b"hello", mask_source=masks))
            parser = FrameParser(expect_masked=False, max_message_size=1 << 20)
            events, data = parser.feed(rest), b""
            while not any(op == OP_TEXT for op, _ in events):
                events += parser.feed(sock.recv(65536))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, parser)
        opened = time.monotonic() - started
        redis.info("memory")
        print(f"{sessions} idle sessions open in {opened:.1f} s", flush=True)
        sigterm_at = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        open_count = sessions
        while open_count:
            for key, _ in selector.select(timeout=60):
                sock, parser = key.fileobj, key.data
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                events = parser.feed(data) if data else [(OP_CLOSE, b"")]
                for op, payload in events:
                    if op == OP_PING:
                        sock.send(encode_frame(OP_PONG, payload, mask_source=masks))
                    elif op == OP_CLOSE:
                        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1006
                        closes[code] = closes.get(code, 0) + 1
                        if data:
                            sock.send(encode_frame(OP_CLOSE, payload[:2], mask_source=masks))
                        selector.unregister(sock)
                        sock.close()
                        open_count -= 1
                        break
        clients_closed = time.monotonic() - sigterm_at
        code = proxy.proc.wait(120)
        exited = time.monotonic() - sigterm_at
        saved = len(redis.keys("iwsproxy:snap:*"))
        memory = redis.info("memory")["used_memory"] - base_memory
        print(f"evacuated {sessions} idle sessions: clients closed {dict(closes)} within {clients_closed:.2f} s, "
              f"process exited ({code}) {exited:.2f} s after SIGTERM; {saved} sessions at rest in Redis, "
              f"{memory / 1024 / 1024:.1f} MiB of Redis memory ({memory / max(saved, 1):.0f} bytes per session)")
        print(proxy.stderr_text()[-600:])
    finally:
        proxy.kill()
        backend.kill()
        redis_server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
