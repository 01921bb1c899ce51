"""Load: as many idle pipes as the configured maximum, then one more is refused with 503."""

from __future__ import annotations

import random
import resource

import pytest
import websocket

from conftest import wait_for

PIPES = 1000


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
                            str(PIPES), "--log-level", "warning")
    warm = proxy.connect()
    warm.close()
    wait_for(lambda: proxy.pipes() == [], what="warm-up pipe to end")
    before = rss_kib(proxy.proc.pid)
    clients = [proxy.connect(timeout=30) for _ in range(PIPES)]
    after = rss_kib(proxy.proc.pid)
    print(f"\n{PIPES} idle pipes: proxy RSS {before} -> {after} KiB, {(after - before) / PIPES:.1f} KiB per pipe")
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
