"""A throwaway redis-server child on 127.0.0.1 for the shared-registry tests (no persistence)."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import threading

__all__ = ["RedisServer", "redis_server_missing"]


def redis_server_missing() -> str | None:
    """Why the Redis tests cannot run here, or None if they can."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server; .ci/run installs it)"
    if importlib.util.find_spec("redis") is None:
        return "the redis client is not installed (pip install redis)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """``redis-server --port N --bind 127.0.0.1 --save '' --appendonly no``, killable and restartable."""

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="iwsproxy-redis-")
        self._lines: list[str] = []

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """Start on ``self.port``; return once redis logs that it accepts connections."""
        if self.running:
            raise RuntimeError("redis-server already running")
        self._lines = []
        ready = threading.Event()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read_log, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"redis-server did not start within {timeout} s:\n{self.log_text()}")
        if not self._pong():
            self.kill()
            raise RuntimeError(f"redis-server is ready but does not answer PING:\n{self.log_text()}")
        return self

    def _read_log(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        """Keep redis's log (it is also the readiness signal); set ``ready`` when it accepts, or at EOF."""
        for line in proc.stdout:
            self._lines.append(line)
            if "Ready to accept connections" in line:
                ready.set()
        ready.set()

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self, db: int = 0):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, decode_responses=True, socket_timeout=5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, the data (in memory only) is gone."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        self._dir.cleanup()

    def log_text(self) -> str:
        return "".join(self._lines)

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running}, pid={self.proc.pid if self.proc else None})"


if __name__ == "__main__":  # python tests/redis_server.py: one for trying things by hand
    server = RedisServer().start()
    print(server.url(), "pid", server.proc.pid, flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
