"""Load: as many idle pipes as the configured maximum, then one more is refused with 503.

The idle pipes hold no greenlet and stay within the memory target of 32 KiB RSS each.
"""

from __future__ import annotations

import random
import resource

import pytest
import websocket

from conftest import wait_for
from iwsproxy.io.server import GC_YOUNG_THRESHOLD

PIPES = 1000
KIB_PER_IDLE_PIPE = 32  # the target (about 20 measured on a 2-core machine)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, min(hard, 8 * PIPES))   # children inherit it
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < 3 * PIPES + 100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {PIPES} pipes")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_max_pipes_then_503_and_the_rest_keep_working(processes, many_files):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, "--max-pipes", str(PIPES), "--max-pipes-per-ip",
                            str(PIPES), "--log-level", "warning", "--park-after", "0.2")
    greenlets = lambda: proxy.admin("GET", path="/admin/status")[1]["greenlets"]  # noqa: E731
    warm = proxy.connect()
    warm.close()
    wait_for(lambda: proxy.pipes() == [], what="warm-up pipe to end")
    base = greenlets()
    assert proxy.admin("GET", path="/admin/status")[1]["gc"]["threshold"][0] == GC_YOUNG_THRESHOLD  # serve tuned it
    before = rss_kib(proxy.proc.pid)
    clients = [proxy.connect(timeout=30) for _ in range(PIPES)]
    wait_for(lambda: greenlets() <= base, timeout=30, what="the idle pipes to give up their greenlets")
    after = rss_kib(proxy.proc.pid)
    per_pipe = (after - before) / PIPES
    print(f"\n{PIPES} idle pipes: proxy RSS {before} -> {after} KiB, {per_pipe:.1f} KiB per pipe")
    assert per_pipe <= KIB_PER_IDLE_PIPE
    with pytest.raises(websocket.WebSocketBadStatusException) as full:
        proxy.connect()
    assert full.value.status_code == 503
    for ws in random.sample(clients, 25):
        ws.send("still served")
        assert ws.recv() == "still served"
    for ws in clients:
        ws.close(timeout=1)
    wait_for(lambda: proxy.pipes() == [], timeout=30, what="every pipe to end")
    again = proxy.connect()
    again.send("room again")
    assert again.recv() == "room again"
    again.close()
