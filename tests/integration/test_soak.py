"""Sessions served one after another leave nothing behind: the soak scenario of ``iwsproxy bench --soak``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ADMIN_TOKEN, ROOT
from iwsproxy.tools.process import ChildProcess
from iwsproxy.tools.soak import soak_rounds

ROUND_SESSIONS = 200
# Per session, the libraries leave some objects to the cyclic collector for a moment: Werkzeug's
# URL matcher (a closure per request) and websocket-client's WebSocket of the backend handshake,
# about 22 objects and 40 blocks kept here. A session of the proxy's own left in a reference
# cycle adds about 60 objects and 130 blocks to that.
MAX_BLOCKS_PER_SESSION = 100


class GarbageProxy(ChildProcess):
    """``tests/garbage_proxy.py``: the proxy, with what its cyclic collector finds kept and counted."""

    def __init__(self, backend_url: str):
        super().__init__("garbage_proxy", name="garbage-proxy", env={
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
            "IWSPROXY_BIND": "127.0.0.1:0", "IWSPROXY_BACKENDS": backend_url, "IWSPROXY_ADMIN_TOKEN": ADMIN_TOKEN,
            "IWSPROXY_RESUME_GRACE": "1", "IWSPROXY_MAX_PIPES_PER_IP": "100000"})

    def garbage(self) -> dict:
        return self.get_json("/garbage")


def test_ended_sessions_are_freed_without_the_cyclic_collector(processes):
    """Sessions echo, then close or drop their connection (detached, then expired): none of them
    may be left in a reference cycle, which only a full collection would free (under load, every
    few thousand sessions, and the process's RSS grows meanwhile)."""
    backend = processes.echo()
    proxy = processes.add(GarbageProxy(backend.url))

    def serve(rounds: int) -> None:
        soak_rounds(proxy.port, proxy.proc.pid, rounds, round_sessions=ROUND_SESSIONS, resume_grace_s=1.0,
                    token=ADMIN_TOKEN)

    serve(1)  # first use: caches, free lists, the first backend connection's imports
    before = proxy.garbage()
    rounds = 3
    serve(rounds)
    after = proxy.garbage()
    sessions = rounds * ROUND_SESSIONS
    kept = {name: n - before["types"].get(name, 0) for name, n in after["types"].items()}
    ours = {name: n for name, n in kept.items() if name.startswith("iwsproxy.") and n}
    assert not ours, f"{sessions} sessions left objects of the proxy in reference cycles: {ours}"
    blocks = (after["allocated_blocks"] - before["allocated_blocks"]) / sessions
    largest = sorted(kept.items(), key=lambda item: -item[1])[:12]
    assert blocks < MAX_BLOCKS_PER_SESSION, f"{blocks:.0f} blocks more per session; kept in cycles: {largest}"


def test_bench_soak_command(tmp_path):
    """``iwsproxy bench --soak``: a line per round asked for, the growth summary, fds back to where they were."""
    out = subprocess.run([sys.executable, "-m", "iwsproxy", "bench", "--soak", "200", "--round-sessions", "100",
                          "--every", "1", "--json", str(tmp_path / "soak.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split("|")[0].strip() == "200" for line in lines), out.stdout
    assert "from 100 to 200 sessions:" in lines, out.stdout
    fds = next(line for line in lines if "open fds after each round" in line)
    before = fds.rpartition("before the first session: ")[2].rstrip(")")
    assert fds.split(": ")[1].split(" ")[0] == before, fds  # every round ended with the fds of before
    assert [s["sessions"] for s in json.loads((tmp_path / "soak.json").read_text())["samples"]] == [100, 200]
