"""The benchmark runs end to end in its quick mode, gunicorn path included, in rounds, and prints
its table (no timing asserts)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from iwsproxy.tools.bench import BenchError, LoadGenerator, in_turn, pinned
from iwsproxy.tools.loadgen import Phase, _Client, _close_all

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 60
HEADER = ("| path | small msg/s | small p50 ms | small p99 ms | server CPU us/msg | server cores busy "
          "| msg/s per busy core | 1 MiB MB/s | idle RTT p50 ms | idle RTT p99 ms | RSS KiB/idle pipe |")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_quick_bench_prints_the_table(tmp_path):
    json_path = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    # quick, and shorter still: the table's shape is checked, not its figures
    shorter = ["--duration", "0.6", "--rtt-count", "100", "--idle-pipes", "50", "--idle-settle", "1"]
    run = subprocess.run([sys.executable, "-m", "iwsproxy.tools.bench", "--quick", *shorter, "--no-nginx", "--gunicorn",
                          "--compare-with", ROOT, "--proxy-workers", "2", "--json", str(json_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    lines = run.stdout.splitlines()
    assert HEADER in lines, run.stdout

    rows = {_cells(line)[0]: _cells(line)[1:] for line in lines if line.startswith("| ") and line != HEADER}
    assert set(rows) == {"direct", "proxy", "proxy-base", "proxy-gunicorn"}, run.stdout
    for path in ("proxy", "proxy-base", "proxy-gunicorn"):  # every cell measured, RSS per idle pipe included
        assert len(rows[path]) == 10 and all(_is_number(cell) for cell in rows[path]), rows[path]
    assert all(_is_number(cell) for cell in rows["direct"][:6]), rows["direct"]  # the echo backends' CPU
    assert any("2 processes per server" in line for line in lines), run.stdout
    # the throughput ratios come with their range over the rounds (quick: two)
    assert any(line.startswith("- proxy/direct msg/s: ") and "(rounds " in line for line in lines), run.stdout
    assert any(line.startswith("machine: nproc ") for line in lines), run.stdout

    data = json.loads(json_path.read_text())
    assert [r["path"] for r in data["results"]] == ["direct", "proxy", "proxy-base", "proxy-gunicorn"]
    two_cpus = len(os.sched_getaffinity(0)) >= 2
    assert [r["notes"]["idle_rtt_pinned"] for r in data["results"]] == [two_cpus] * 4
    for r in data["results"]:  # every path ran in every round; the row is the mean of its rounds
        assert [len(r["rounds"][s]) for s in ("small", "large")] == [2, 2], r
        assert r["small_msgs_per_s"] == pytest.approx(sum(r["rounds"]["small"]) / 2)
        assert r["large_mb_per_s"] == pytest.approx(sum(r["rounds"]["large"]) / 2)
        assert r["msgs_per_core_s"] == pytest.approx(1e6 / r["cpu_us_per_msg"])  # direct: the echo backends'
        assert len(r["rounds"]["small_cpu_us"]) == 2
    assert len(data["round_ratios"]["proxy-gunicorn/direct msg/s"]) == 2
    assert len(data["round_ratios"]["proxy-base/direct msg/s"]) == 2


def test_cpu_per_message_and_per_busy_core_are_compared_with_nginx_round_by_round():
    from iwsproxy.tools.bench_report import PathResult, format_ratios, ratios, round_ratios

    proxy = PathResult("proxy", small_msgs_per_s=40_000, cpu_us_per_msg=6.0, msgs_per_core_s=1e6 / 6.0,
                       rounds={"small": [40_000], "small_cpu_us": [5.0, 7.0], "small_per_core": [2e5, 1e5]})
    nginx = PathResult("nginx", small_msgs_per_s=80_000, cpu_us_per_msg=2.0, msgs_per_core_s=5e5,
                       rounds={"small": [80_000], "small_cpu_us": [2.0, 2.0], "small_per_core": [5e5, 5e5]})
    direct = PathResult("direct", small_msgs_per_s=100_000, cpu_us_per_msg=1.0, msgs_per_core_s=1e6)
    values = ratios([direct, proxy, nginx])
    assert values["proxy/nginx CPU us/msg"] == pytest.approx(3.0)
    assert values["proxy/nginx msg/s per busy core"] == pytest.approx(1 / 3)
    assert values["proxy/nginx msg/s"] == pytest.approx(0.5)
    assert "proxy/direct CPU us/msg" not in values  # the echo backends' CPU is another job
    per_round = round_ratios([direct, proxy, nginx])
    assert per_round["proxy/nginx CPU us/msg"] == pytest.approx([2.5, 3.5])
    assert "- proxy/nginx CPU us/msg: 3.000 (rounds 2.500-3.500)" in format_ratios(values, per_round).splitlines()


def test_compare_with_needs_a_source_tree(tmp_path):
    from iwsproxy.tools.bench import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--compare-with", str(tmp_path)])
    assert parse_args(["--compare-with", ROOT]).compare_with == ROOT


def test_a_worker_closing_on_a_garbled_close_reply_still_closes_every_socket():
    ours, peer = socket.socketpair()
    other, other_peer = socket.socketpair()
    clients = [_Client(ours, b"", 100), _Client(other, b"", 100)]
    peer.sendall(b"\x88\x82abcd\x00\x00")  # a masked Close: a protocol error from a server
    other_peer.sendall(b"\x88\x02\x03\xe8")
    _close_all(clients)  # raised before, and left the sockets open
    assert ours.fileno() == -1 and other.fileno() == -1
    peer.close()
    other_peer.close()


def test_a_dead_load_generator_worker_fails_the_run_at_once():
    loadgen = LoadGenerator(2).start()
    try:
        victim = loadgen._procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        phase = Phase(kind="idle", targets=(), duration_s=1.0)
        started = time.monotonic()
        with pytest.raises(BenchError):  # not after BARRIER_TIMEOUT_S (180 s)
            loadgen.run([phase, phase])
        assert time.monotonic() - started < 30
    finally:
        loadgen.stop()


def test_sigterm_stops_the_bench_and_its_children(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    bench = subprocess.Popen([sys.executable, "-m", "iwsproxy.tools.bench", "--quick", "--no-nginx"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proxy_pid = None
        for line in bench.stderr:  # "[bench] proxy: pid N, port P" once the proxy runs
            if line.startswith("[bench] proxy: pid "):
                proxy_pid = int(line.split()[3].rstrip(","))
                break
        assert proxy_pid is not None
        children = _children(bench.pid)
        assert proxy_pid in children
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(TIMEOUT_S) == 128 + signal.SIGTERM
        for pid in children:  # (multiprocessing's resource tracker ends just after its parent)
            assert _exits_within(pid, 10), f"child {pid} left running"
    finally:
        bench.kill()
        bench.wait()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _exits_within(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)  # readable once the process has exited
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_each_round_starts_one_path_later():
    paths = ["direct", "proxy", "nginx"]
    assert [in_turn(paths, n) for n in range(4)] == [
        ["direct", "proxy", "nginx"], ["proxy", "nginx", "direct"], ["nginx", "direct", "proxy"],
        ["direct", "proxy", "nginx"]]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pinned_puts_each_group_on_its_own_cpu_and_gives_the_cpus_back():
    cpus = sorted(os.sched_getaffinity(0))
    children = [subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
                for _ in range(3)]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(TIMEOUT_S)
    try:
        a, b, c = (child.pid for child in children)
        with pinned([a], [b, c, gone.pid]) as is_pinned:
            assert is_pinned
            assert [os.sched_getaffinity(pid) for pid in (a, b, c)] == [{cpus[0]}, {cpus[1]}, {cpus[1]}]
        assert all(os.sched_getaffinity(pid) == set(cpus) for pid in (a, b, c))
        with pinned(*([a] for _ in range(len(cpus) + 1))) as is_pinned:  # more groups than CPUs: not pinned
            assert not is_pinned and os.sched_getaffinity(a) == set(cpus)
        with pinned() as is_pinned:
            assert not is_pinned
    finally:
        for child in children:
            child.stdin.close()
            child.wait(TIMEOUT_S)
