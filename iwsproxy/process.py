"""Child processes that announce their port: the echo backends and proxies of the demo, tests and bench.

A child prints ``LISTENING <port>`` on stdout once its socket is bound; the
parent waits for that line (with a timeout) instead of sleeping or polling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading

__all__ = ["ChildProcess"]


class ChildProcess:
    """``python -m <module> <args>`` in a child process, killable with SIGKILL."""

    def __init__(self, module: str, *args: str, env: dict | None = None, name: str | None = None):
        self.module = module
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.name = name or module
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._stderr = tempfile.TemporaryFile()
        self._listening = threading.Event()
        self._stdout_lines: list[str] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, path: str = "/") -> str:
        return self.url + (path if path.startswith("/") else "/" + path)

    def start(self, timeout: float = 15.0) -> "ChildProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], env=self.env,
                                     stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
                                     text=True, bufsize=1)
        threading.Thread(target=self._read_stdout, name=f"{self.name}-stdout", daemon=True).start()
        if not self._listening.wait(timeout) or self.port is None:
            self.kill()
            raise RuntimeError(f"{self.name} did not start within {timeout} s:\n{self.stderr_text()}")
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._stdout_lines.append(line)
            if line.startswith("LISTENING ") and self.port is None:
                self.port = int(line.split()[1])
                self._listening.set()
        self._listening.set()  # EOF: the child died before listening (start() reports it)

    def stdout_text(self) -> str:
        return "".join(self._stdout_lines)

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to close anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

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
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> "ChildProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.terminate()
