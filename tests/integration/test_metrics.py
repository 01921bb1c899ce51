"""GET /metrics end to end: real backends killed with SIGKILL, a real proxy, real clients, and gunicorn -w 2;
and, in this process, who owns the greenlet that publishes message counts."""

from __future__ import annotations

import os
import signal
import socket
import urllib.request
from pathlib import Path

import websocket
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from conftest import recv_close, wait_for
from iwsproxy.app import IWSProxy, create_app
from iwsproxy.settings import Settings
from test_gunicorn import Gunicorn

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(proxy) -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value}; no token: /metrics is open like /healthz."""
    with _opener.open(proxy.http_url + "/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def scrape_until(proxy, check, what: str) -> dict[tuple, float]:
    """The first scrape that passes ``check`` (the proxy is another process: look with backoff)."""
    def look():
        rendered = scrape(proxy)
        return rendered if check(rendered) else None
    return wait_for(look, what=what)


def get(rendered: dict, name: str, **labels: str) -> float:
    return rendered.get((name, tuple(sorted(labels.items()))), 0.0)


def exchange(ws, messages: list[str]) -> int:
    """Send ``messages`` and read until each echo arrived in order; returns how many messages came back.

    After a failover, replayed messages the dead backend had already echoed come back twice
    (before the echoes of newer messages: the proxy keeps the order), so extra ones are skipped.
    """
    received = 0
    for text in messages:
        ws.send(text)
    for text in messages:
        while True:
            received += 1
            if ws.recv() == text:
                break
    return received


def test_metrics_follow_traffic_failovers_and_an_overflow(processes):
    limit = 4096
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    proxy = processes.proxy("--backend", a.url, "--backend", b.url, "--buffer-limit", str(limit))
    clients = [proxy.connect() for _ in range(3)]

    # steady traffic: every message counted once each way
    sent = [[f"c{n}-m{i}-" + "x" * i for i in range(10)] for n in range(len(clients))]
    received = sum(exchange(ws, batch) for ws, batch in zip(clients, sent))
    assert received == 30
    nbytes = sum(len(text) for batch in sent for text in batch)
    m = scrape_until(proxy, lambda r: get(r, "iwsproxy_messages_total", direction="to_client") == 30,
                     "30 messages to clients")
    assert get(m, "iwsproxy_messages_total", direction="to_backend") == 30
    assert get(m, "iwsproxy_bytes_total", direction="to_backend") == nbytes
    assert get(m, "iwsproxy_bytes_total", direction="to_client") == nbytes
    assert get(m, "iwsproxy_pipes_active") == 3
    assert get(m, "iwsproxy_pipes_opened_total") == 3
    assert get(m, "iwsproxy_pipes_by_state", state="connected") == 3

    # SIGKILL a: its pipes move to b; replayed messages are sent again (and may come back twice)
    on_a = sum(1 for pipe in proxy.pipes() if pipe["backend"] == a.url)
    assert 1 <= on_a <= 2  # round robin over two backends
    a.kill()
    more = [[f"c{n}-p{i}" for i in range(10)] for n in range(len(clients))]
    received += sum(exchange(ws, batch) for ws, batch in zip(clients, more))
    m = scrape_until(proxy, lambda r: get(r, "iwsproxy_failovers_total") == on_a
                     and get(r, "iwsproxy_messages_total", direction="to_client") == received,
                     f"{on_a} failovers and {received} messages to clients")
    replayed = get(m, "iwsproxy_replayed_messages_total")
    assert get(m, "iwsproxy_messages_total", direction="to_backend") == 60 + replayed
    assert received - 60 <= replayed  # every duplicate the clients saw was a replayed message
    assert get(m, "iwsproxy_failover_duration_seconds_count") == on_a
    assert 0 < get(m, "iwsproxy_failover_duration_seconds_sum") < 30
    assert get(m, "iwsproxy_failover_duration_seconds_bucket", le="+Inf") == on_a
    assert get(m, "iwsproxy_backend_errors_total", backend=a.url) >= on_a
    # (which state each pipe is in is reported once per supervisor turn; the sum is always right)
    assert sum(v for (name, _), v in m.items() if name == "iwsproxy_pipes_by_state") == 3

    # no backend left: one client sends more than its cap and is closed with 1013
    b.kill()
    wait_for(lambda: all(p["backend_state"] == "failing_over" for p in proxy.pipes()), what="failover state")
    victim, *others = clients
    for i in range(5):
        victim.send_binary(bytes([i]) * 1000)
    assert recv_close(victim) == (1013, f"buffer limit of {limit} bytes exceeded")
    m = scrape_until(proxy, lambda r: get(r, "iwsproxy_pipes_active") == 2
                     and get(r, "iwsproxy_pipes_by_state", state="failing_over") == 2
                     and get(r, "iwsproxy_backend_ejections_total", backend=a.url) >= 1,
                     "two pipes waiting for a backend, a ejected")
    assert get(m, "iwsproxy_clients_closed_total", code="1013", reason="overflow") == 1
    assert sum(value for (name, _), value in m.items() if name == "iwsproxy_clients_closed_total") == 1
    assert get(m, "iwsproxy_pipes_opened_total") == 3
    assert get(m, "iwsproxy_failovers_total") == on_a  # the waiting pipes have not failed over yet
    assert get(m, "iwsproxy_backend_errors_total", backend=b.url) >= 1
    assert get(m, "iwsproxy_buffered_bytes") < limit * 2

    # clients leave: every gauge goes back to zero
    for ws in others:
        ws.close()
    victim.close()
    scrape_until(proxy, lambda r: get(r, "iwsproxy_pipes_active") == 0 and get(r, "iwsproxy_buffered_bytes") == 0
                 and all(v == 0 for (name, _), v in r.items() if name == "iwsproxy_pipes_by_state"),
                 "gauges back to zero")


def pipes_per_worker(directory: Path) -> dict[int, float]:
    """Each live worker's iwsproxy_pipes_active, read from its file in PROMETHEUS_MULTIPROC_DIR."""
    counts = {}
    for path in directory.glob("gauge_livesum_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        counts[pid] = sum(s.value for metric in MultiProcessCollector.merge([str(path)])
                          for s in metric.samples if s.name == "iwsproxy_pipes_active")
    return counts


PER_WORKER = 2


def connect_retrying_503(server, attempts: int = 200) -> websocket.WebSocket:
    """A worker at its --max-pipes answers 503; the kernel may give the retry to the other worker."""
    for _ in range(attempts):
        try:
            return server.connect()
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code != 503:
                raise
    raise AssertionError(f"still 503 after {attempts} attempts")


def every_scrape(server, times: int, check) -> bool:
    """Each scrape may be answered by either worker; in multiprocess mode each reports the sum."""
    return all(check(scrape(server)) for _ in range(times))


def test_a_detached_pipe_is_counted_as_detached_until_it_resumes_or_expires(processes):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url, "--resume-grace", "30")
    ws = proxy.connect()
    assert exchange(ws, ["hello"]) == 1
    ws.sock.shutdown(socket.SHUT_RDWR)  # the client's network drops: no Close
    ws.sock.close()
    m = scrape_until(proxy, lambda r: get(r, "iwsproxy_pipes_by_state", state="detached") == 1, "a detached pipe")
    assert get(m, "iwsproxy_pipes_by_state", state="connected") == 0
    back = proxy.connect(ws.client_id)
    assert exchange(back, ["again"]) in (1, 2)  # 2: "hello" again, its fence was unanswered at the drop
    m = scrape_until(proxy, lambda r: get(r, "iwsproxy_pipes_by_state", state="connected") == 1, "the pipe back")
    assert get(m, "iwsproxy_pipes_by_state", state="detached") == 0
    assert get(m, "iwsproxy_client_resume_events_total", event="detached") == 1
    assert get(m, "iwsproxy_client_resume_events_total", event="resumed") == 1
    back.close()
    m = scrape_until(proxy, lambda r: get(r, "iwsproxy_pipes_active") == 0, "the pipe to end")
    assert get(m, "iwsproxy_client_resume_events_total", event="expired") == 0


def test_a_detached_session_ended_by_something_else_than_its_grace_is_not_counted_as_expired(processes):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url, "--resume-grace", "30", "--idle-timeout", "1")
    ws = proxy.connect()
    assert exchange(ws, ["hello"]) == 1
    ws.sock.shutdown(socket.SHUT_RDWR)
    ws.sock.close()
    m = scrape_until(proxy, lambda r: get(r, "iwsproxy_pipes_active") == 0, "the idle timeout to end the session")
    assert get(m, "iwsproxy_client_resume_events_total", event="detached") == 1
    assert get(m, "iwsproxy_client_resume_events_total", event="expired") == 0


def test_gunicorn_workers_report_the_sum(processes, tmp_path):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    server = Gunicorn(a.url, b.url, workers=2)
    server.env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    # at most 2 pipes per worker, so 4 clients fill both (the kernel picks who accepts; a full one says 503)
    server.env["IWSPROXY_MAX_PIPES"] = str(PER_WORKER)
    processes.add(server)

    clients = [connect_retrying_503(server) for _ in range(2 * PER_WORKER)]
    for n, ws in enumerate(clients):
        assert exchange(ws, [f"hello {n}"]) == 1
    wait_for(lambda: sum(pipes_per_worker(directory).values()) == len(clients), what="every pipe counted")
    assert sorted(pipes_per_worker(directory).values()) == [PER_WORKER, PER_WORKER], "both workers serve pipes"
    total = len(clients)
    wait_for(lambda: every_scrape(server, 6, lambda r: get(r, "iwsproxy_pipes_active") == total
                                  and get(r, "iwsproxy_pipes_opened_total") == total
                                  and get(r, "iwsproxy_pipes_by_state", state="connected") == total
                                  and get(r, "iwsproxy_messages_total", direction="to_backend") == total
                                  and get(r, "iwsproxy_messages_total", direction="to_client") == total),
             what=f"{total} pipes and messages on every scrape")

    # SIGKILL one worker: gunicorn's child_exit hook marks it dead, its gauges stop counting
    per_worker = pipes_per_worker(directory)
    victim = max(per_worker, key=per_worker.get)
    survivors = total - int(per_worker[victim])
    os.kill(victim, signal.SIGKILL)
    alive = []
    for n, ws in enumerate(clients):
        try:
            exchange(ws, [f"still there {n}"])
            alive.append(ws)
        except (websocket.WebSocketException, OSError):
            ws.close()
    assert len(alive) == survivors
    # the dead worker's gauge file is gone (child_exit) and a new worker has loaded the app
    wait_for(lambda: victim not in (pids := pipes_per_worker(directory)) and len(pids) == 2,
             what="the dead worker marked, its replacement up")
    wait_for(lambda: every_scrape(server, 4, lambda r: get(r, "iwsproxy_pipes_active") == survivors),
             what=f"{survivors} active pipes on every scrape")
    # counters of the dead worker are kept
    assert every_scrape(server, 4, lambda r: get(r, "iwsproxy_pipes_opened_total") == total)

    for ws in alive:
        ws.close()
    wait_for(lambda: every_scrape(server, 4, lambda r: get(r, "iwsproxy_pipes_active") == 0),
             what="no active pipes")


def test_the_message_publisher_is_a_greenlet_of_the_manager_which_its_shutdown_stops():
    manager = IWSProxy.manager(create_app(Settings()))
    metrics = manager.metrics

    def published():
        return metrics.registry.get_sample_value("iwsproxy_messages_total", {"direction": "to_backend"})

    metrics.MESSAGES_PUBLISH_S = 0.01
    metrics.messages("to_backend", 2, 20)
    [publisher] = manager._timers
    publisher.join(5)
    assert publisher.dead and published() == 2  # it ran, and published
    metrics.MESSAGES_PUBLISH_S = 60
    metrics.messages("to_backend", 3, 30)
    [publisher] = manager._timers
    assert manager.close_all(timeout=1)
    assert publisher.dead and not manager._timers  # not left running past the shutdown
