"""The servers of the benchmark's paths: echo backends, the proxy (``iwsproxy serve``, another
source tree's, gunicorn) and nginx, each started at the beginning of a run and stopped at its end."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from iwsproxy.tools.loadgen import TIMEOUT_SCALE
from iwsproxy.tools.process import ChildProcess
from iwsproxy.tools.procfs import process_tree

__all__ = ["BenchError", "HOST", "ROOT", "NginxProcess", "start_echo_backends", "start_proxy", "start_gunicorn"]

ROOT = Path(__file__).resolve().parents[2]  # the checkout: wsgi.py and the iwsproxy package
HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0 * TIMEOUT_SCALE  # for a child process to listen
NGINX_BACKLOG = 4096


class BenchError(Exception):
    """The benchmark could not run (a server or a load generator worker failed)."""


def _child_env(extra: dict | None = None, root: Path = ROOT) -> dict:
    pythonpath = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": pythonpath, **(extra or {})}


def _start(child: ChildProcess, started: list, timeout: float = START_TIMEOUT_S) -> ChildProcess:
    started.append(child)
    try:
        return child.start(timeout)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


def start_echo_backends(n: int, started: list) -> list[ChildProcess]:
    backends = []
    for i in range(n):
        echo = ChildProcess("iwsproxy.tools.echo", "--port", "0", "--host", HOST, "--name", f"echo{i + 1}",
                            env=_child_env(), name=f"echo{i + 1}")
        backends.append(_start(echo, started))
    return backends


def start_proxy(backends: list[ChildProcess], started: list, *, root: Path = ROOT,
                name: str = "proxy", workers: int = 1) -> ChildProcess:
    """``iwsproxy serve`` from the source tree ``root`` (this one by default), with ``--workers``
    when ``workers`` is more than 1 (a tree from before that option cannot)."""
    urls = [arg for b in backends for arg in ("--backend", b.url)]
    # --log-level belongs to the top-level parser: `iwsproxy --log-level warning serve ...`
    # one load generator address opens every pipe: lift the per-address and per-process caps
    limits = ["--max-pipes", "100000", "--max-pipes-per-ip", "100000"]
    if workers > 1:
        limits += ["--workers", str(workers)]
    proxy = ChildProcess("iwsproxy", "--log-level", "warning", "serve", "--bind", f"{HOST}:0", *limits, *urls,
                         env=_child_env(root=root), name=name)
    return _start(proxy, started)


_GUNICORN_CONFIG = '''\
# written by iwsproxy.tools.bench
loglevel = "warning"
graceful_timeout = 3


def when_ready(server):
    print("LISTENING %d" % server.LISTENERS[0].getsockname()[1], flush=True)
'''


def start_gunicorn(backends: list[ChildProcess], workdir: Path, started: list, workers: int = 1) -> ChildProcess:
    config = workdir / "gunicorn.conf.py"
    config.write_text(_GUNICORN_CONFIG)
    proxy = ChildProcess("gunicorn", "-k", "iwsproxy.gunicorn.Worker", "-w", str(workers),
                         "-b", f"{HOST}:0", "-c", str(config), "--chdir", str(ROOT), "wsgi:app",
                         env=_child_env({"IWSPROXY_BACKENDS": ",".join(b.url for b in backends),
                                         "IWSPROXY_MAX_PIPES": "100000", "IWSPROXY_MAX_PIPES_PER_IP": "100000"}),
                         name="proxy-gunicorn")
    return _start(proxy, started, timeout=2 * START_TIMEOUT_S)


_NGINX_CONFIG = """\
# written by iwsproxy.tools.bench
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream echo_backends {{
{servers}
    }}
    server {{
        listen {host}:{port} backlog={backlog};
        location / {{
            proxy_pass http://echo_backends;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""


class NginxProcess:
    """nginx in the foreground, with a config written to ``workdir``.

    The listening socket is bound here (port 0) and handed to nginx through the
    ``NGINX`` environment variable, nginx's own mechanism for inheriting sockets:
    the port is known before nginx starts and connections made before it is ready
    wait in the backlog, so there is nothing to poll for.
    """

    def __init__(self, binary: str, backend_ports: list[int], workdir: Path, connections: int, workers: int = 1):
        self.binary = binary
        self.workers = workers
        self.backend_ports = backend_ports
        self.workdir = workdir
        self.connections = connections
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._stderr = tempfile.TemporaryFile()

    def _write_config(self, port: int) -> Path:
        servers = "\n".join(f"        server {HOST}:{p};" for p in self.backend_ports)
        config = self.workdir / "nginx.conf"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        config.write_text(_NGINX_CONFIG.format(dir=self.workdir, host=HOST, port=port, servers=servers,
                                               backlog=NGINX_BACKLOG, connections=self.connections, workers=self.workers,
                                               nofile=nofile if nofile != resource.RLIM_INFINITY else 65536))
        return config

    def start(self) -> "NginxProcess":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((HOST, 0))
            listener.listen(NGINX_BACKLOG)
            self.port = listener.getsockname()[1]
            config = self._write_config(self.port)
            args = [self.binary, "-e", "stderr", "-p", str(self.workdir), "-c", str(config)]
            check = subprocess.run([*args, "-t", "-q"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=30)
            if check.returncode != 0:
                raise BenchError(f"nginx -t rejected the config:\n{check.stderr}")
            fd = listener.fileno()
            self.proc = subprocess.Popen(args, env={**os.environ, "NGINX": f"{fd};"}, pass_fds=(fd,),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)
        finally:
            listener.close()  # nginx has its copy
        return self

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM (nginx's fast shutdown), then SIGKILL to the master and its workers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            tree = process_tree(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in tree:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait(timeout)
        self._stderr.close()
