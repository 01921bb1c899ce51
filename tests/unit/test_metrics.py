"""PrometheusMetrics: the hooks, called directly, and the text they render."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from iwsproxy.metrics import (CLOSE_REASONS, FAILOVER_BUCKETS_S, STATES, Metrics, PrometheusMetrics, backend_label,
                              close_code_label, close_reason_label)


def samples(metrics: Metrics) -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value} of everything ``metrics`` renders."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(rendered: dict, name: str, **labels: str) -> float:
    return rendered[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics() -> PrometheusMetrics:
    return PrometheusMetrics()


def test_the_base_class_records_nothing():
    base = Metrics()
    base.pipe_opened()
    base.messages("to_backend", 3, 30)
    assert base.render()[0] == b""


def test_every_metric_is_there_from_the_start(metrics):
    rendered = samples(metrics)
    assert value(rendered, "iwsproxy_pipes_active") == 0
    for state in STATES:
        assert value(rendered, "iwsproxy_pipes_by_state", state=state) == 0
    for direction in ("to_backend", "to_client"):
        assert value(rendered, "iwsproxy_messages_total", direction=direction) == 0
        assert value(rendered, "iwsproxy_bytes_total", direction=direction) == 0
    for name in ("iwsproxy_pipes_opened_total", "iwsproxy_failovers_total", "iwsproxy_replayed_messages_total",
                 "iwsproxy_flushed_bytes_total", "iwsproxy_buffered_bytes",
                 "iwsproxy_failover_duration_seconds_count"):
        assert value(rendered, name) == 0


def test_pipes_and_states(metrics):
    for _ in range(3):
        metrics.pipe_opened()
        metrics.pipe_state(None, "connected")
    metrics.pipe_state("connected", "failing_over")
    metrics.pipe_state("failing_over", "connected")
    metrics.pipe_state("connected", "closed")
    metrics.pipe_state("closed", None)
    metrics.pipe_closed()
    rendered = samples(metrics)
    assert value(rendered, "iwsproxy_pipes_opened_total") == 3
    assert value(rendered, "iwsproxy_pipes_active") == 2
    assert value(rendered, "iwsproxy_pipes_by_state", state="connected") == 2
    assert value(rendered, "iwsproxy_pipes_by_state", state="failing_over") == 0
    assert value(rendered, "iwsproxy_pipes_by_state", state="closed") == 0


def test_buffered_bytes_follow_the_deltas(metrics):
    metrics.buffered_bytes(1000)
    metrics.buffered_bytes(500)
    metrics.buffered_bytes(-1200)
    assert value(samples(metrics), "iwsproxy_buffered_bytes") == 300


def test_failovers_fill_the_histogram(metrics):
    metrics.failover(0.0005, replayed=2, flushed_bytes=100)
    metrics.failover(0.2, replayed=0, flushed_bytes=0)
    metrics.failover(40.0, replayed=1, flushed_bytes=20)
    rendered = samples(metrics)
    assert value(rendered, "iwsproxy_failovers_total") == 3
    assert value(rendered, "iwsproxy_replayed_messages_total") == 3
    assert value(rendered, "iwsproxy_flushed_bytes_total") == 120
    name = "iwsproxy_failover_duration_seconds"
    assert value(rendered, name + "_count") == 3
    assert value(rendered, name + "_sum") == pytest.approx(40.2005)
    assert value(rendered, name + "_bucket", le="0.001") == 1
    assert value(rendered, name + "_bucket", le="0.25") == 2
    assert value(rendered, name + "_bucket", le="30.0") == 2
    assert value(rendered, name + "_bucket", le="+Inf") == 3
    assert FAILOVER_BUCKETS_S[0] == 0.001 and FAILOVER_BUCKETS_S[-1] == 30.0


def test_messages_and_bytes_per_direction(metrics):
    metrics.messages("to_backend", 3, 30)
    metrics.messages("to_backend", 1, 5)
    metrics.messages("to_client", 2, 7)
    rendered = samples(metrics)
    assert value(rendered, "iwsproxy_messages_total", direction="to_backend") == 4
    assert value(rendered, "iwsproxy_bytes_total", direction="to_backend") == 35
    assert value(rendered, "iwsproxy_messages_total", direction="to_client") == 2
    assert value(rendered, "iwsproxy_bytes_total", direction="to_client") == 7


@pytest.mark.parametrize(("code", "cause", "label"), [
    # the session's end cause names the reason, whatever the code
    (1013, "overflow", "overflow"),      # the client's buffer, or the process's budget
    (1013, "deadline", "deadline"),
    (1001, "idle", "idle"),
    (1001, "client_unresponsive", "client_unresponsive"),
    (1000, "backend_ended", "backend_ended"),
    (4321, "backend_ended", "backend_ended"),
    (4409, "takeover", "takeover"),
    # a cause several closes share: the code tells them apart
    (1012, "proxy", "restart"),
    (1011, "proxy", "internal"),
    (1001, "proxy", "going_away"),
    (1013, "proxy", "other"),
    (4000, "proxy", "other"),            # not the backend's code, though in its range
    (1002, "protocol", "protocol"),
    (1007, "protocol", "protocol"),
    (1008, "protocol", "protocol"),  # too many fragments for the message's size
    (1009, "protocol", "too_big"),
    # no cause known: the code alone
    (1013, None, "other"),
    (1000, None, "backend_ended"),
    (4321, None, "backend_ended"),
    (1001, None, "going_away"),
    (1014, None, "other"),
])
def test_close_reasons_come_from_the_end_cause_then_the_code(code, cause, label):
    assert close_reason_label(code, cause) == label


@pytest.mark.parametrize("cause", [None, "client_closed", "overflow", "grace_expired", "idle", "deadline",
                                   "client_unresponsive", "backend_ended", "proxy", "takeover", "protocol", "?"])
def test_close_reasons_are_a_fixed_set(cause):
    codes = [0, 999, 1000, 1001, 1002, 1005, 1006, 1007, 1008, 1009, 1011, 1012, 1013, 1014, 2999, 3000, 4409, 4999,
             5000]
    assert {close_reason_label(code, cause) for code in codes} <= set(CLOSE_REASONS)


def test_close_codes_of_applications_are_grouped():
    assert close_code_label(1013) == "1013"
    assert close_code_label(4321) == "4xxx"
    assert close_code_label(3000) == "3xxx"
    assert close_code_label(7) == "other"


def test_clients_closed_are_counted_by_code_and_cause(metrics):
    metrics.client_closed(1013, "overflow")
    metrics.client_closed(1013, "overflow")
    metrics.client_closed(4001, "backend_ended")
    rendered = samples(metrics)
    assert value(rendered, "iwsproxy_clients_closed_total", code="1013", reason="overflow") == 2
    assert value(rendered, "iwsproxy_clients_closed_total", code="4xxx", reason="backend_ended") == 1


def test_backend_labels_hide_credentials_and_queries(metrics):
    url = "ws://user:secret@10.0.0.5:9000/ws?token=abc"
    assert backend_label(url) == "ws://10.0.0.5:9000/ws"
    assert backend_label("wss://[::1]/x") == "wss://[::1]/x"
    metrics.backend_error(url)
    metrics.backend_error(url)
    metrics.backend_ejected(url)
    metrics.backend_error("ws://127.0.0.1:1")
    rendered = samples(metrics)
    assert value(rendered, "iwsproxy_backend_errors_total", backend="ws://10.0.0.5:9000/ws") == 2
    assert value(rendered, "iwsproxy_backend_ejections_total", backend="ws://10.0.0.5:9000/ws") == 1
    assert value(rendered, "iwsproxy_backend_errors_total", backend="ws://127.0.0.1:1") == 1
    assert value(rendered, "iwsproxy_backend_ejections_total", backend="ws://127.0.0.1:1") == 0
    assert b"secret" not in metrics.render()[0]


def test_resume_events(metrics):
    metrics.resume_event("detached")
    metrics.resume_event("resumed")
    metrics.resume_event("something new")
    rendered = samples(metrics)
    assert value(rendered, "iwsproxy_client_resume_events_total", event="detached") == 1
    assert value(rendered, "iwsproxy_client_resume_events_total", event="resumed") == 1
    assert value(rendered, "iwsproxy_client_resume_events_total", event="other") == 1


def test_each_instance_has_its_own_registry():
    one, two = PrometheusMetrics(), PrometheusMetrics()
    one.pipe_opened()
    assert value(samples(one), "iwsproxy_pipes_active") == 1
    assert value(samples(two), "iwsproxy_pipes_active") == 0
    assert REGISTRY.get_sample_value("iwsproxy_pipes_active") is None


def test_a_given_registry_is_used():
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    metrics.messages("to_client", 1, 3)
    assert registry.get_sample_value("iwsproxy_messages_total", {"direction": "to_client"}) == 1


def test_message_counts_are_tallied_and_published_later_or_on_scrape():
    later = []
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, call_later=lambda delay, fn: later.append((delay, fn)))

    def published(direction):
        return registry.get_sample_value("iwsproxy_messages_total", {"direction": direction})

    metrics.messages("to_backend", 3, 30)
    metrics.messages("to_backend", 2, 20)
    metrics.messages("to_client", 1, 5)
    assert len(later) == 1 and later[0][0] == PrometheusMetrics.MESSAGES_PUBLISH_S  # one publish per period
    assert published("to_backend") == 0
    later.pop()[1]()
    assert (published("to_backend"), published("to_client")) == (5, 1)
    assert registry.get_sample_value("iwsproxy_bytes_total", {"direction": "to_backend"}) == 50

    metrics.messages("to_client", 4, 8)  # a new period
    assert len(later) == 1
    assert value(samples(metrics), "iwsproxy_messages_total", direction="to_client") == 5  # a scrape publishes
    metrics.messages("to_client", 1, 1)
    metrics.pipe_closed()  # so does a closing pipe
    assert published("to_client") == 6
    later.pop()[1]()  # the timer still fires: nothing left to publish, nothing counted twice
    assert published("to_client") == 6


def test_importing_the_hooks_loads_no_metrics_library():
    code = "import sys, iwsproxy.metrics; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


# ---- multiprocess mode: each process is a subprocess (the mode is chosen when prometheus_client loads) ----
WORKER = textwrap.dedent("""
    import os
    from iwsproxy.metrics import PrometheusMetrics
    m = PrometheusMetrics()
    for _ in range({pipes}):
        m.pipe_opened()
        m.pipe_state(None, "connected")
    m.messages("to_backend", {pipes}, 10)
    m.buffered_bytes(100)
    m.failover(0.01, 1, 5)
    print(os.getpid())
""")

SCRAPE = textwrap.dedent("""
    import json, sys
    from prometheus_client import multiprocess
    from prometheus_client.parser import text_string_to_metric_families
    from iwsproxy.metrics import PrometheusMetrics
    for pid in sys.argv[1:]:
        multiprocess.mark_process_dead(int(pid))
    body = PrometheusMetrics().render()[0].decode()
    print(json.dumps({s.name + json.dumps(s.labels, sort_keys=True): s.value
                      for f in text_string_to_metric_families(body) for s in f.samples}))
""")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, env_dir, *args: str) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(env_dir)}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_multiprocess_mode_sums_processes_and_forgets_dead_gauges(tmp_path):
    first = _run(WORKER.format(pipes=2), tmp_path)
    _run(WORKER.format(pipes=3), tmp_path)
    both = json.loads(_run(SCRAPE, tmp_path))
    assert both['iwsproxy_pipes_active{}'] == 5
    assert both['iwsproxy_pipes_by_state{"state": "connected"}'] == 5
    assert both['iwsproxy_buffered_bytes{}'] == 200
    assert both['iwsproxy_messages_total{"direction": "to_backend"}'] == 5
    assert both['iwsproxy_failover_duration_seconds_count{}'] == 2
    # the first "worker" died: its gauges stop counting, its counters stay
    after = json.loads(_run(SCRAPE, tmp_path, first))
    assert after['iwsproxy_pipes_active{}'] == 3
    assert after['iwsproxy_buffered_bytes{}'] == 100
    assert after['iwsproxy_messages_total{"direction": "to_backend"}'] == 5
    assert after['iwsproxy_failovers_total{}'] == 2


def test_multiprocess_dir_must_exist(tmp_path):
    code = ("from iwsproxy.exceptions import ConfigError\n"
            "from iwsproxy.metrics import PrometheusMetrics\n"
            "try:\n    PrometheusMetrics()\nexcept ConfigError as exc:\n    print(exc)\n")
    assert _run(code, tmp_path / "missing").startswith(f"PROMETHEUS_MULTIPROC_DIR='{tmp_path / 'missing'}'")
