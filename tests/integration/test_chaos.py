"""Chaos: 20 clients streaming while backends are SIGKILLed and replaced.

At-least-once (the default) must lose nothing and keep each client's order of
first deliveries; duplicates are counted and reported. The same run in
at-most-once mode shows the loss that replay prevents. The backends take 20 ms
per batch (``--work-ms``), as real backends take time to process, so messages
are in flight when a backend dies. A third run parks idle readers and supervisors
after 5 ms, so that they are given up and brought back between nearly every
message while the backends die.
"""

from __future__ import annotations

import threading

import pytest

from conftest import wait_for
from streams import StreamingClient

CLIENTS = 20
KILLS = 3
INTERVAL_S = 0.01


def run_chaos(processes, delivery: str, park_after_s: float = 1.0) -> list[StreamingClient]:
    backends = [processes.echo("--work-ms", "20", name=f"b{i}") for i in range(3)]
    args = ["--delivery", delivery, "--pong-timeout", "5", "--park-after", str(park_after_s)]
    for backend in backends:
        args += ["--backend", backend.url]
    proxy = processes.proxy(*args)
    stop = threading.Event()
    clients = [StreamingClient(proxy.url, INTERVAL_S, stop).start() for _ in range(CLIENTS)]
    try:
        wait_for(lambda: all(c.distinct() >= 10 for c in clients), what="streams to flow")
        for kill in range(KILLS):
            serving = {p["backend"] for p in proxy.pipes()}
            victim = next(b for b in backends if b.alive and b.url in serving)
            marks = {c: c.distinct() for c in clients}
            victim.kill()
            replacement = processes.echo("--work-ms", "20", name=f"r{kill}")
            backends.append(replacement)
            assert proxy.admin("POST", {"url": replacement.url})[0] == 201
            # every client keeps streaming past the kill before the next one
            wait_for(lambda: all(c.distinct() >= marks[c] + 15 for c in clients), timeout=20,
                     what=f"streams to recover from kill {kill + 1}")
        stop.set()
        for c in clients:
            c.finish()
        status = proxy.admin("GET", path="/admin/status")[1]
        print(f"\n[{delivery}] failovers={status['counters'].get('failovers')} "
              f"replayed={status['counters'].get('replayed', 0)} "
              f"sent={sum(c.sent for c in clients)} lost={sum(c.lost() for c in clients)} "
              f"duplicates={sum(c.duplicates() for c in clients)} "
              f"readers_parked={status['counters'].get('readers_parked', 0)}")
        assert len(proxy.pipes()) == CLIENTS  # nobody was disconnected
        if park_after_s < INTERVAL_S:
            assert status["counters"]["readers_parked"] > CLIENTS * 10  # parked between messages, over and over
        return clients
    finally:
        stop.set()
        for c in clients:
            c.close()


@pytest.mark.parametrize("park_after_s", [1.0, 0.005], ids=["park-after-1s", "park-after-5ms"])
def test_at_least_once_loses_nothing_through_three_sigkills(processes, park_after_s):
    clients = run_chaos(processes, "at-least-once", park_after_s)
    for c in clients:
        assert c.error is None and c.closed_with is None
        assert c.lost() == 0, f"{c.client_id[:8]} lost {c.lost()} of {c.sent}"
        first = c.first_deliveries()
        assert first == sorted(first) == list(range(c.sent))
    assert sum(c.duplicates() for c in clients) <= sum(c.sent for c in clients) // 10


@pytest.mark.parametrize("delivery", ["at-most-once"])
def test_at_most_once_shows_the_loss_replay_prevents(processes, delivery):
    clients = run_chaos(processes, delivery)
    for c in clients:
        assert c.error is None and c.closed_with is None
        assert c.duplicates() == 0
        first = c.first_deliveries()
        assert first == sorted(first)
    assert sum(c.lost() for c in clients) > 0
