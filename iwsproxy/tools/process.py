"""Child processes that announce their port: the echo backends and proxies of the demo, tests and bench.

A child prints ``LISTENING <port>`` on stdout once its socket is bound; the
parent waits for that line (with a timeout, on a selector) instead of sleeping
or polling.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["ChildProcess", "LISTENING"]

LISTENING = "LISTENING"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds the iwsproxy package


class ChildProcess:
    """``python -m <module> <args>`` in a child process, killable with SIGKILL."""

    def __init__(self, module: str, *args: str, env: dict | None = None, name: str | None = None):
        self.module = module
        self.args = list(args)
        base = dict(os.environ)
        base["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, base.get("PYTHONPATH")) if p)
        self.env = {**base, **(env or {})}
        self.name = name or module
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._stderr = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, path: str = "/") -> str:
        return self.url + (path if path.startswith("/") else "/" + path)

    def command(self) -> list[str]:
        """The child's command line: ``python -m <module> <args>`` (a subclass may run another program)."""
        return [sys.executable, "-m", self.module, *self.args]

    def start(self, timeout: float = 15.0) -> "ChildProcess":
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        # stderr goes to a file: a pipe nobody reads would block a chatty child
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command(), env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr)
        try:
            line = self._first_line(timeout)
        except BaseException:
            self.kill()
            raise
        word, _, port = line.partition(" ")
        if word != LISTENING or not port.isdigit():
            message = f"{self.name}: unexpected first line {line!r}; stderr:\n{self.stderr_text()}"
            self.kill()
            raise RuntimeError(message)
        self.port = int(port)
        return self

    def _first_line(self, timeout: float) -> str:
        """The child's first stdout line; RuntimeError if it dies or stays silent for ``timeout``."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"{self.name}: no {LISTENING} line within {timeout} s; "
                                       f"stderr:\n{self.stderr_text()}")
                if not selector.select(remaining):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    try:
                        code = self.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        code = None
                    raise RuntimeError(f"{self.name} exited (code {code}) before listening; "
                                       f"stderr:\n{self.stderr_text()}")
                data += chunk
        return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def get_json(self, path: str) -> dict:
        import urllib.request  # here: it imports ssl, which a child must patch before importing

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.http_url + path, timeout=5) as response:
            return json.loads(response.read())

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    alive = running

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def kill(self) -> None:
        """SIGKILL and reap: the process gets no chance to close anything."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._release()

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._release()
        return self.proc.returncode

    def _release(self) -> None:
        if self.proc is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "ChildProcess":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc_info) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, port={self.port}, running={self.running})"
