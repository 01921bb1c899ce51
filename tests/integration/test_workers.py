"""``iwsproxy serve --workers 2``: a master and two worker processes on one port, real processes.

Which worker a connection lands on is the kernel's choice (a hash of its addresses), so a test
that needs a given worker opens connections until one lands there; over keep-alive, every
request of one HTTP connection is answered by the same worker."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time

import pytest

from conftest import ADMIN_TOKEN, Proxy, recv_close, stats, wait_for
from test_resume import drop, first_deliveries, numbers

ATTEMPTS = 200  # connections opened to find every worker: the chance of missing one is 2**-200


def _get(conn: http.client.HTTPConnection, path: str) -> dict:
    conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, (path, response.status, body)
    return json.loads(body)


def each_worker(proxy, *paths: str, workers: int = 2) -> dict[int, dict[str, dict]]:
    """For each worker's pid: its /healthz and its answers to ``paths``, all over one connection."""
    seen: dict[int, dict[str, dict]] = {}
    for _ in range(ATTEMPTS):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        try:
            health = _get(conn, "/healthz")
            if health["pid"] not in seen:
                seen[health["pid"]] = {"/healthz": health, **{path: _get(conn, path) for path in paths}}
        finally:
            conn.close()
        if len(seen) == workers:
            return seen
    raise AssertionError(f"only {sorted(seen)} of {workers} workers answered {ATTEMPTS} connections")


def backend_urls(proxy) -> dict[int, set[str]]:
    return {pid: {b["url"] for b in answers["/admin/backends"]["backends"]}
            for pid, answers in each_worker(proxy, "/admin/backends").items()}


def worker_pids(proxy) -> set[int]:
    return set(each_worker(proxy))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_both_workers_serve_on_one_port_each_reporting_its_pid(processes):
    backend = processes.echo()
    proxy = processes.proxy("--workers", "2", "--backend", backend.url)
    pids = worker_pids(proxy)
    assert len(pids) == 2 and proxy.proc.pid not in pids
    for pid in pids:  # the master's children
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rpartition(")")[2].split()[1]) == proxy.proc.pid
    clients = [proxy.connect() for _ in range(6)]
    for i, ws in enumerate(clients):
        ws.send(f"m{i}")
        assert ws.recv() == f"m{i}"
        ws.close()


def test_an_admin_change_on_one_worker_reaches_the_other_and_a_replacement(processes):
    a, b = processes.echo(name="a"), processes.echo(name="b")
    proxy = processes.proxy("--workers", "2", "--backend", a.url)
    assert set(map(frozenset, backend_urls(proxy).values())) == {frozenset({a.url})}

    status, _ = proxy.admin("POST", {"url": b.url})  # answered by one worker
    assert status == 201
    wait_for(lambda: all(urls == {a.url, b.url} for urls in backend_urls(proxy).values()),
             what="both workers to have the added backend")

    clients = [proxy.connect() for _ in range(8)]
    status, body = proxy.admin("DELETE", {"url": a.url, "drain": True, "window_s": 0.2})
    assert status == 202, body
    wait_for(lambda: all(urls == {b.url} for urls in backend_urls(proxy).values()),
             what="both workers to drain the backend")
    for i, ws in enumerate(clients):  # every pipe moved, nothing lost
        ws.send(f"m{i}")
        assert ws.recv() == f"m{i}"
    assert stats(a)["connections_open"] == 0

    victim = min(worker_pids(proxy))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in worker_pids(proxy), what="a replacement worker")
    # the replacement has the master's set, not the backends given at start
    assert all(urls == {b.url} for urls in backend_urls(proxy).values())
    for ws in clients:
        ws.close()


def test_a_resume_landing_on_the_other_worker_is_handed_to_the_holder_and_loses_nothing(processes):
    backend = processes.echo("--stream-interval-ms", "5")
    proxy = processes.proxy("--workers", "2", "--backend", backend.url)
    ws = proxy.connect()
    received = numbers(ws, 20)
    handed_over = 0
    for _ in range(40):  # each reconnect lands on either worker: until one lands on the other
        drop(ws)
        ws = proxy.connect(ws.client_id)
        received += numbers(ws, received[-1] + 20)
        workers = each_worker(proxy, "/admin/status")
        handed_over = sum(w["/admin/status"]["counters"].get("handed_over", 0) for w in workers.values())
        if handed_over:
            break
    assert handed_over >= 1, "no reconnect landed on the worker without the session"
    received += numbers(ws, received[-1] + 20)
    order = first_deliveries(received)
    assert order == list(range(1, order[-1] + 1)), "every number at least once, in order"
    assert stats(backend)["connections_total"] == 1  # the backend never noticed
    ws.close()


def test_sigterm_closes_every_client_of_every_worker_with_1012_and_all_processes_exit(processes):
    backend = processes.echo()
    proxy = processes.proxy("--workers", "2", "--backend", backend.url)
    handoff_dir = re.search(r"handoff directory (\S+)", proxy.stderr_text()).group(1)
    assert os.path.isdir(handoff_dir) and os.stat(handoff_dir).st_mode & 0o077 == 0
    pids = worker_pids(proxy)
    clients = []
    for _ in range(40):  # until both workers hold pipes
        ws = proxy.connect()
        ws.send("x")
        assert ws.recv() == "x"
        clients.append(ws)
        if len(clients) >= 4 and all(w["/healthz"]["pipes"] for w in each_worker(proxy).values()):
            break
    assert all(w["/healthz"]["pipes"] for w in each_worker(proxy).values())

    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    for ws in clients:
        assert recv_close(ws)[0] == 1012
    assert proxy.proc.wait(15) == 0
    assert time.monotonic() - started < 8
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(handoff_dir)  # the private directory it made is gone


def test_sighup_is_passed_to_every_worker_which_ignores_it_and_nothing_is_dropped(processes):
    backend = processes.echo()
    proxy = processes.proxy("--workers", "2", "--backend", backend.url)
    pids = worker_pids(proxy)
    ws = proxy.connect()
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proxy.stderr_text().count("SIGHUP ignored") == 2, what="both workers to log the SIGHUP")
    assert "SIGHUP: passed on to every worker" in proxy.stderr_text()
    assert worker_pids(proxy) == pids and proxy.running  # no successor, no second master
    ws.send("after")
    assert ws.recv() == "after"
    ws.close()


def test_a_sighup_restart_of_one_process_into_a_master_is_refused(processes):
    from iwsproxy.cli import HANDOVER_ENV
    from iwsproxy.io.handover import ENV_CHANNEL

    assert HANDOVER_ENV == ENV_CHANNEL
    proxy = Proxy("--workers", "2", env={HANDOVER_ENV: "99"})
    with pytest.raises(RuntimeError, match="exited .code 1. before listening") as refused:
        proxy.start()
    assert "a restart cannot turn one process into a master" in str(refused.value)  # (its stderr)


def test_with_redis_the_workers_share_the_redis_registry(processes):
    from conftest import needs
    from redis_server import RedisServer, redis_server_missing

    needs(redis_server_missing(), "the Redis tests")
    redis = RedisServer().start()
    try:
        a, b = processes.echo(name="a"), processes.echo(name="b")
        proxy = processes.proxy("--workers", "2", "--backend", a.url, "--redis-url", redis.url())
        assert proxy.admin("POST", {"url": b.url})[0] == 201
        wait_for(lambda: all(urls == {a.url, b.url} for urls in backend_urls(proxy).values()),
                 what="both workers to have the added backend")
        assert redis.client().zrange("iwsproxy:backends", 0, -1) == [a.url, b.url]
        proxy.terminate()
    finally:
        redis.stop()


def test_with_prometheus_multiprocess_the_master_marks_a_killed_worker_dead(processes, tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    backend = processes.echo()
    proxy = processes.proxy("--workers", "2", "--backend", backend.url,
                            env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    victim = min(worker_pids(proxy))
    assert any(name.startswith("gauge_livesum") and name.endswith(f"_{victim}.db") for name in os.listdir(metrics_dir))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in worker_pids(proxy), what="a replacement worker")
    names = os.listdir(metrics_dir)
    assert not any(name.startswith("gauge_live") and name.endswith(f"_{victim}.db") for name in names), names
    assert f"counter_{victim}.db" in names  # its counts stay in the sums
