import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import iwsproxy.pool
from iwsproxy.pool import POLICIES, Admin, Backend, BackendPool, Health

A, B, C, D = "ws://a/", "ws://b/", "ws://c/", "ws://d/"


def make_pool(*urls, **kwargs):
    kwargs.setdefault("rng", random.Random(0))
    pool = BackendPool(**kwargs)
    for url in urls:
        pool.add(url)
    return pool


def picks(pool, n, now=0.0, release=False):
    """URLs of ``n`` successive acquires (None when nothing was picked)."""
    out = []
    for _ in range(n):
        backend = pool.acquire(now)
        out.append(backend and backend.url)
        if backend and release:
            pool.release(backend)
    return out


def eject(pool, url, now=0.0):
    for _ in range(pool.max_failures):
        ejected = pool.record_failure(url, now, "refused")
    assert ejected
    return pool._backends[url]


# -- purity -----------------------------------------------------------------------

FORBIDDEN = ("gevent", "geventwebsocket", "socket", "_socket", "flask", "werkzeug", "websocket")

PURITY_CHECK = """
import importlib, json, sys, types
# A bare package object, so only the module under test (and what it imports) is
# loaded, not whatever iwsproxy/__init__.py re-exports from the I/O layer.
package = types.ModuleType("iwsproxy")
package.__path__ = [sys.argv[1]]
sys.modules["iwsproxy"] = package
before = set(sys.modules)
importlib.import_module("iwsproxy." + sys.argv[2])
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.parametrize("module", ["pool", "backoff"])
def test_module_is_pure(module):
    package_dir = str(Path(iwsproxy.pool.__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", PURITY_CHECK, package_dir, module],
        capture_output=True, text=True, timeout=30, check=True,
    )
    imported = json.loads(result.stdout)
    assert f"iwsproxy.{module}" in imported
    leaked = [name for name in imported if name.split(".")[0] in FORBIDDEN]
    assert leaked == []


# -- construction and membership --------------------------------------------------


def test_unknown_policy_and_bad_max_failures_are_rejected():
    with pytest.raises(ValueError, match="unknown policy"):
        BackendPool(policy="random")
    with pytest.raises(ValueError, match="max_failures"):
        BackendPool(max_failures=0)
    for policy in POLICIES:
        BackendPool(policy=policy)


def test_add_dedupes_exact_strings():
    pool = make_pool()
    assert pool.add(A) is True
    assert pool.add(A) is False
    assert pool.add("ws://a") is True  # no normalisation: a different string
    assert pool.add(B) is True
    assert pool.urls() == [A, "ws://a", B]
    assert len(pool) == 3
    assert A in pool and C not in pool


def test_remove_even_with_clients():
    pool = make_pool(A, B)
    a = pool.acquire(0.0)
    assert a.url == A
    assert pool.remove(A) is True
    assert pool.remove(A) is False
    assert pool.urls() == [B]
    # the pipe that was on A reports back: all no-ops
    pool.release(a)
    pool.record_success(A, 1.0)
    assert pool.record_failure(A, 1.0, "closed") is False
    assert pool.urls() == [B]


def test_a_pipe_on_a_removed_backend_never_releases_the_backend_added_again_under_its_url():
    pool = make_pool(A, policy="exclusive")
    old = pool.acquire(0.0)
    pool.remove(A)
    pool.add(A)  # DELETE then POST: a new backend at the same URL
    new = pool.acquire(0.0)
    assert new is not old and new.url == A
    pool.release(old)  # the first pipe leaves the old one at last
    assert pool.snapshot(0.0)[0]["clients"] == 1
    assert pool.acquire(0.0) is None  # still one client per backend
    pool.release(new)
    assert pool.acquire(0.0) is new


def test_release_never_goes_below_zero():
    pool = make_pool(A)
    pool.acquire(0.0)
    pool.release(pool.get(A))
    pool.release(pool.get(A))
    assert pool.snapshot(0.0)[0]["clients"] == 0


def test_drain_lifecycle():
    pool = make_pool(A, B, policy="least_connections")
    assert pool.acquire(0.0).url == A
    assert pool.acquire(0.0).url == B
    assert pool.acquire(0.0).url == A  # A has 2 clients
    assert pool.drain(A) is True
    assert pool.snapshot(0.0)[0]["state"] == "draining"
    assert picks(pool, 3) == [B, B, B]  # no new pipes on A, though B is busier
    pool.release(pool.get(A))
    assert A in pool  # one client left
    pool.release(pool.get(A))
    assert A not in pool
    assert pool.drain(A) is False


def test_drain_without_clients_removes_at_once():
    pool = make_pool(A, B)
    assert pool.drain(A) is True
    assert pool.urls() == [B]


def test_re_adding_a_draining_backend_makes_it_ready_in_place():
    pool = make_pool(A, B)
    pool.acquire(0.0)  # A
    pool.drain(A)
    assert pool.add(A) is True
    assert pool.urls() == [A, B]
    a = pool.snapshot(0.0)[0]
    assert (a["admin"], a["state"], a["clients"]) == ("ready", "up", 1)
    pool.release(pool.get(A))
    assert A in pool


# -- selection policies ----------------------------------------------------------


def test_round_robin_sequence():
    pool = make_pool(A, B, C)
    assert picks(pool, 7) == [A, B, C, A, B, C, A]
    assert [d["clients"] for d in pool.snapshot(0.0)] == [3, 2, 2]


def test_round_robin_cursor_survives_adds_and_removes():
    pool = make_pool(A, B, C)
    assert picks(pool, 2) == [A, B]
    pool.remove(B)  # the backend the cursor points at
    pool.add(D)
    assert picks(pool, 4) == [C, D, A, C]
    pool.remove(A)
    pool.add(A)  # added again: now last in order
    assert picks(pool, 3) == [D, A, C]


def test_least_connections_sequence():
    pool = make_pool(A, B, C, policy="least_connections")
    assert picks(pool, 3) == [A, B, C]
    pool.release(pool.get(B))
    assert picks(pool, 1) == [B]
    pool.release(pool.get(C))
    pool.release(pool.get(A))
    # A and C tied at 0 (B has 1): taken in insertion order from after the last pick (B)
    assert picks(pool, 2) == [C, A]
    # all tied at 1 now; ties rotate instead of always favouring the first backend
    assert picks(pool, 6, release=True) == [B, C, A, B, C, A]


def test_exclusive_one_client_per_backend():
    pool = make_pool(A, B, policy="exclusive")
    assert picks(pool, 3) == [A, B, None]
    pool.release(pool.get(A))
    assert picks(pool, 2) == [A, None]
    pool.release(pool.get(B))
    pool.release(pool.get(A))
    assert picks(pool, 2) == [B, A]  # rotates when several are free


@pytest.mark.parametrize("policy", POLICIES)
def test_exclude(policy):
    pool = make_pool(A, B, C, policy=policy)
    assert pool.acquire(0.0, exclude={A, B}).url == C
    pool.release(pool.get(C))
    assert pool.acquire(0.0, exclude=[A, "ws://elsewhere/"]).url in (B, C)
    assert pool.acquire(0.0, exclude=(A, B, C)) is None
    assert pool.usable_count(0.0) == 3  # usable backends exist; the caller decides


@pytest.mark.parametrize("policy", POLICIES)
def test_empty_pool_gives_none(policy):
    pool = make_pool(policy=policy)
    assert pool.acquire(0.0) is None
    assert pool.usable_count(0.0) == 0
    assert pool.next_change_at(0.0) is None


# -- failures, ejection, probing -------------------------------------------------


def test_ejected_after_max_failures():
    pool = make_pool(A, B, max_failures=3, eject_base_s=1.0)
    assert pool.record_failure(A, 0.0, "refused") is False
    assert pool.record_failure(A, 0.1, "refused") is False
    assert pool.record_failure(A, 0.2, "timed out") is True
    a = pool._backends[A]
    assert a.health is Health.EJECTED
    assert 1.1 <= a.ejected_until <= 1.3  # 0.2 + 1.0 +-10%
    assert (a.consecutive_failures, a.total_failures, a.ejections) == (3, 3, 1)
    assert a.last_error == "timed out"
    assert "3 consecutive failures" in a.last_change and "timed out" in a.last_change
    assert picks(pool, 3, now=0.5) == [B, B, B]
    assert pool.usable_count(0.5) == 1


def test_success_interrupts_a_run_of_failures():
    pool = make_pool(A, max_failures=3)
    for _ in range(3):
        assert pool.record_failure(A, 0.0, "refused") is False
        assert pool.record_failure(A, 0.0, "refused") is False
        pool.record_success(A, 0.0)
    a = pool._backends[A]
    assert (a.health, a.consecutive_failures, a.total_failures) == (Health.UP, 0, 6)


def test_probe_success_puts_the_backend_up():
    pool = make_pool(A, eject_base_s=1.0)
    a = eject(pool, A)
    until = a.ejected_until
    assert pool.acquire(until - 0.01) is None
    assert pool.acquire(until) is a  # the probe
    assert a.health is Health.EJECTED
    pool.record_success(A, until + 0.1)
    assert (a.health, a.ejected_until, a.ejections) == (Health.UP, None, 0)
    assert a.last_change == "probe succeeded"
    assert pool.record_failure(A, until + 0.2, "refused") is False  # a fresh run of failures


def test_probe_failure_ejects_again_for_longer():
    pool = make_pool(A, eject_base_s=1.0, eject_max_s=60.0)
    a = eject(pool, A)
    first = a.ejected_until
    assert pool.acquire(first) is a
    assert pool.record_failure(A, first + 0.1, "refused") is True  # one failure is enough
    assert a.ejections == 2
    assert 1.8 <= a.ejected_until - (first + 0.1) <= 2.2
    assert "probe failed" in a.last_change
    second = a.ejected_until
    assert pool.record_failure(A, second, "refused") is True
    assert 3.6 <= a.ejected_until - second <= 4.4


def test_late_failure_during_an_ejection_does_not_extend_it():
    pool = make_pool(A)
    a = eject(pool, A)
    until = a.ejected_until
    assert pool.record_failure(A, 0.5, "closed") is False
    assert (a.ejected_until, a.ejections, a.total_failures) == (until, 1, 4)


def test_ejection_durations_are_capped():
    pool = make_pool(A, eject_base_s=1.0, eject_max_s=5.0)
    now = 0.0
    eject(pool, A, now)
    for _ in range(10):
        now = pool._backends[A].ejected_until
        assert pool.record_failure(A, now, "refused") is True
        assert pool._backends[A].ejected_until - now <= 5.0


def test_next_change_at():
    pool = make_pool(A, B, C)
    assert pool.next_change_at(0.0) is None
    a = eject(pool, A, now=0.0)
    b = eject(pool, B, now=0.5)
    assert pool.next_change_at(0.6) == min(a.ejected_until, b.ejected_until)
    later = max(a.ejected_until, b.ejected_until)
    assert pool.next_change_at(later - 0.01) == later
    assert pool.next_change_at(later) is None  # expired: probe-able, nothing pending


def test_all_ejected_then_wait_for_the_next_change():
    pool = make_pool(A, B)
    eject(pool, A)
    eject(pool, B)
    assert pool.acquire(0.0) is None
    assert pool.usable_count(0.0) == 0
    wake_at = pool.next_change_at(0.0)
    assert pool.usable_count(wake_at) == 1
    assert pool.acquire(wake_at) is not None


# -- views ---------------------------------------------------------------------------


def test_snapshot_shape():
    pool = make_pool(A, B, C)
    pool.acquire(0.0)  # A
    pool.acquire(0.0)  # B
    a = eject(pool, A, now=10.0)
    pool.drain(B)
    snapshot = pool.snapshot(10.25)
    json.dumps(snapshot)  # serialisable as is
    assert [d["url"] for d in snapshot] == [A, B, C]
    assert set(snapshot[0]) == {
        "url", "state", "admin", "health", "clients", "consecutive_failures",
        "total_failures", "ejections", "ejected_for_s", "last_error", "last_change",
    }
    assert [d["state"] for d in snapshot] == ["ejected", "draining", "up"]
    assert snapshot[0]["ejected_for_s"] == round(a.ejected_until - 10.25, 3)
    assert snapshot[0]["last_error"] == "refused"
    assert snapshot[1]["admin"] == "draining" and snapshot[1]["health"] == "up"
    assert snapshot[2] == {
        "url": C, "state": "up", "admin": "ready", "health": "up", "clients": 0,
        "consecutive_failures": 0, "total_failures": 0, "ejections": 0,
        "ejected_for_s": None, "last_error": None, "last_change": "added",
    }
    assert pool.snapshot(a.ejected_until + 1)[0]["ejected_for_s"] == 0.0


def test_backend_defaults():
    backend = Backend("ws://x/")
    assert (backend.health, backend.admin, backend.clients) == (Health.UP, Admin.READY, 0)
    assert backend.usable(0.0)
