"""``iwsproxy bench``: the same load direct, through the proxy (and nginx), in one run.

::

    python -m iwsproxy.tools.bench [--quick] [--duration S] [--rounds R] [--connections N] [--window W]
                             [--idle-pipes M] [--no-nginx] [--gunicorn] [--no-pin] [--json PATH]

Two echo backends (``python -m iwsproxy.tools.echo``) serve every path, and every path's
server is started at the beginning and stopped at the end:

``direct``          the load generator talks to the echo backends (connections round robin)
``proxy``           ``python -m iwsproxy serve`` in front of both backends
``proxy-base``      the proxy of another source tree (``--compare-with DIR``): a same-run A/B
``proxy-gunicorn``  the same app under gunicorn's gevent-websocket worker (``--gunicorn``)
``nginx``           nginx with a minimal WebSocket reverse-proxy config (if ``nginx`` is on PATH)

Scenarios: first the idle ones, path after path, each on a fresh server:

1. idle RTT: one connection, ``--rtt-count`` round trips of a 32-byte message, one at a time
   (a round trip ends when the bytes of the echo arrive, before the client parses them: a
   proxy's ping fence that came with the echo is answered after that, as a browser would, so
   neither parsing it nor sending the pong is inside the measurement). With two CPUs or more
   the load generator is pinned to one CPU and the servers (echo backends, proxy or nginx, with
   their children) to another for this phase (``--no-pin``: left to the scheduler). Left to it,
   the direct path's client and backend sometimes share a CPU and hand over without waking
   another one (0.02 ms instead of 0.06 here); a path with a server in the middle cannot, so
   its difference to direct then depends on where the scheduler put the processes, not on the
   server. Pinned, every path crosses between the CPUs the same way, as between hosts;
2. memory per idle pipe: ``--idle-pipes`` connections, each exchanges one message and stays
   open; the server's RSS (VmRSS, summed over its process tree) before, and after the pipes
   have been quiet for ``--idle-settle`` seconds (an idle pipe gives up its greenlets after
   about three times ``--park-after``), per pipe.

Then the throughput scenarios, in ``--rounds`` rounds of ``--duration`` / ``--rounds`` seconds
per path; each round takes the paths in turn, starting one path later than the round before.
A shared machine's load drifts over a run; taken in turns, every path sees the same drift, and
the ratios are also given per round (lowest-highest), which shows how noisy the run was:

3. small messages: ``--connections`` connections, 100-byte binary messages, ``--window`` in
   flight per connection: echoes per second and RTT percentiles; the server's CPU time
   (user+sys from /proc, its whole process tree) divided by the round trips it carried (one
   round trip = one message);
4. large messages: ``--large-connections`` connections, 1 MiB binary messages one at a time:
   echoed payload bytes per second (MB = 10**6 bytes).

The load comes from :mod:`iwsproxy.tools.loadgen` worker processes (raw sockets, the
project's codec, ``selectors``). After the table, the CPU use of the load
generator, the echo backends and the server during each throughput phase is
printed: a path limited by the generator shows a busiest worker near 100 %, a
path limited by the server under test shows the server near 100 % (the proxy is
one process: 100 % is all it can use).

On a slow or emulated machine, ``IWSPROXY_BENCH_TIMEOUT_SCALE=N`` multiplies every timeout
of the run (connecting, echoes, barriers, child start) by N.

Progress goes to stderr, the report to stdout; ``--json PATH`` also writes every
number (with the CPU figures and raw RSS/CPU readings) as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from threading import BrokenBarrierError

from iwsproxy.tools.loadgen import (BARRIER_TIMEOUT_S, DRAIN_TIMEOUT_S, TIMEOUT_SCALE, Phase, PhaseResult,
                                    Target, worker_main)
from iwsproxy.tools.process import ChildProcess

__all__ = ["Options", "PathResult", "LoadGenerator", "run", "main"]

ROOT = Path(__file__).resolve().parents[2]  # the checkout: wsgi.py and the iwsproxy package
SMALL_BYTES = 100
LARGE_BYTES = 1024 * 1024
RTT_BYTES = 32
HOST = "127.0.0.1"
RESULT_TIMEOUT_S = 120.0 * TIMEOUT_SCALE  # beyond the phase's own length
STOP_TIMEOUT_S = 5.0 * TIMEOUT_SCALE
START_TIMEOUT_S = 15.0 * TIMEOUT_SCALE  # for a child process to listen
NGINX_BACKLOG = 4096

COLUMNS = (
    ("small msg/s", "small_msgs_per_s", "{:.0f}"),
    ("small p50 ms", "small_p50_ms", "{:.3f}"),
    ("small p99 ms", "small_p99_ms", "{:.3f}"),
    ("proxy CPU us/msg", "cpu_us_per_msg", "{:.1f}"),
    ("1 MiB MB/s", "large_mb_per_s", "{:.1f}"),
    ("idle RTT p50 ms", "idle_p50_ms", "{:.3f}"),
    ("idle RTT p99 ms", "idle_p99_ms", "{:.3f}"),
    ("RSS KiB/idle pipe", "rss_kib_per_pipe", "{:.1f}"),
)


class BenchError(Exception):
    """The benchmark could not run (a server or a load generator worker failed)."""


@dataclass(frozen=True)
class Options:
    duration_s: float = 6.0   # per path and throughput scenario, over all rounds
    rounds: int = 3
    connections: int = 50
    window: int = 16
    large_connections: int = 4
    rtt_count: int = 2000
    idle_pipes: int = 1000
    idle_settle_s: float = 5.0
    workers: int = 2
    nginx: bool = True
    gunicorn: bool = False
    compare_with: str | None = None  # a source tree whose proxy runs as the path "proxy-base"
    pin: bool = True
    json_path: str | None = None
    quick: bool = False


@dataclass
class PathResult:
    """One row of the table; None where a measurement does not apply."""

    path: str
    small_msgs_per_s: float | None = None
    small_p50_ms: float | None = None
    small_p99_ms: float | None = None
    cpu_us_per_msg: float | None = None
    large_mb_per_s: float | None = None
    idle_p50_ms: float | None = None
    idle_p99_ms: float | None = None
    rss_kib_per_pipe: float | None = None
    # phase -> who -> CPU use in % of one core: where the time went, so a bottleneck
    # other than the server under test (the generator, the echo backends) shows
    cpu_pct: dict = field(default_factory=dict)
    # scenario -> its figure in each round (small: msg/s, large: MB/s), in round order
    rounds: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


# ---- command line ----
def parse_args(argv: list[str] | None) -> Options:
    if argv and argv[0] == "--":
        # `iwsproxy bench -- --quick`: the top-level CLI passes the separator on
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="iwsproxy bench", description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("--quick", action="store_true", help="smoke run for CI (< 20 s): shorter phases, fewer pipes")
    parser.add_argument("--duration", type=float,
                        help="seconds per path and throughput scenario, split over the rounds (default 6, quick 1.5)")
    parser.add_argument("--rounds", type=int,
                        help="rounds of the throughput scenarios, the paths in turn in each (default 3, quick 2)")
    parser.add_argument("--connections", type=int, help="connections of the small-message phase (default 50)")
    parser.add_argument("--window", type=int, help="messages in flight per connection (default 16)")
    parser.add_argument("--large-connections", type=int, help="connections of the 1 MiB phase (default 4)")
    parser.add_argument("--rtt-count", type=int, help="idle round trips (default 2000, quick 300)")
    parser.add_argument("--idle-pipes", type=int, help="idle connections for the memory phase (default 1000, quick 200)")
    parser.add_argument("--idle-settle", type=float,
                        help="seconds the idle pipes stay quiet before RSS is read (default 5, quick 3.5)")
    parser.add_argument("--workers", type=int, help="load generator processes (default 2)")
    parser.add_argument("--no-nginx", action="store_true", help="skip nginx even if it is on PATH")
    parser.add_argument("--gunicorn", action="store_true", help="also run the proxy under gunicorn")
    parser.add_argument("--compare-with", metavar="DIR",
                        help="also run the proxy of the source tree DIR (e.g. a checkout of the code before a "
                             "change) as the path proxy-base: a same-run A/B")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave the idle RTT phase's processes to the scheduler (default: client and servers "
                             "pinned to two different CPUs)")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--soak", metavar="SESSIONS", help="instead: the soak, short sessions served in rounds "
                                                           "with the proxy's memory after each (iwsproxy.tools.soak)")
    args = parser.parse_args(argv)
    quick = args.quick
    options = Options(
        duration_s=args.duration if args.duration is not None else (1.5 if quick else 6.0),
        rounds=args.rounds if args.rounds is not None else (2 if quick else 3),
        connections=args.connections if args.connections is not None else 50,
        window=args.window if args.window is not None else 16,
        large_connections=args.large_connections if args.large_connections is not None else 4,
        rtt_count=args.rtt_count if args.rtt_count is not None else (300 if quick else 2000),
        idle_pipes=args.idle_pipes if args.idle_pipes is not None else (200 if quick else 1000),
        idle_settle_s=args.idle_settle if args.idle_settle is not None else (3.5 if quick else 5.0),
        workers=args.workers if args.workers is not None else 2,
        nginx=not args.no_nginx,
        gunicorn=args.gunicorn,
        compare_with=args.compare_with,
        pin=not args.no_pin,
        json_path=args.json_path,
        quick=quick,
    )
    for name in ("rounds", "connections", "window", "large_connections", "rtt_count", "workers"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if options.compare_with is not None and not (Path(options.compare_with) / "iwsproxy" / "__init__.py").is_file():
        parser.error(f"--compare-with {options.compare_with}: not a source tree of iwsproxy")
    if options.duration_s <= 0 or options.idle_pipes < 0 or not 0 <= options.idle_settle_s < BARRIER_TIMEOUT_S / 2:
        parser.error(f"--duration must be positive, --idle-pipes not negative and --idle-settle in [0, "
                     f"{BARRIER_TIMEOUT_S / 2:g})")
    return options


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- /proc ----
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx and gunicorn work in child processes)."""
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """user + sys CPU time of ``pids`` (fields 14 and 15 of /proc/<pid>/stat)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3 (state)
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def pinned(*groups: list[int]) -> Iterator[bool]:
    """Run ``groups[i]`` (lists of pids) on CPU number i of this process's allowed CPUs, and put
    each process back on the CPUs it had afterwards. Yields whether it did: not with fewer
    allowed CPUs than groups, no group, or a pid that may not be moved (then nothing is moved).
    A process that exits meanwhile is skipped."""
    cpus = sorted(os.sched_getaffinity(0))
    saved: dict[int, set[int]] = {}
    try:
        is_pinned = bool(groups) and len(cpus) >= len(groups) and _pin(groups, cpus, saved)
        if not is_pinned:
            _unpin(saved)
        yield is_pinned
    finally:
        _unpin(saved)


def _pin(groups: tuple[list[int], ...], cpus: list[int], saved: dict[int, set[int]]) -> bool:
    for cpu, pids in zip(cpus, groups):
        for pid in pids:
            try:
                allowed = os.sched_getaffinity(pid)
                os.sched_setaffinity(pid, {cpu})
            except ProcessLookupError:
                continue  # exited meanwhile
            except OSError:
                return False  # not ours to move, or a cpuset that forbids it
            saved[pid] = allowed
    return True


def _unpin(saved: dict[int, set[int]]) -> None:
    for pid, allowed in saved.items():
        try:
            os.sched_setaffinity(pid, allowed)
        except OSError:
            pass  # exited meanwhile
    saved.clear()


def rss_kib(pids: list[int]) -> int:
    """Sum of VmRSS of ``pids``, in KiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def machine_line() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"machine: nproc {os.cpu_count()}, {model}, Python {platform.python_version()} ({sys.platform})"


def raise_nofile_limit(needed: int = 0) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (the hard one too, where allowed, if ``needed`` is more).

    Every child started later inherits it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))  # root may raise the hard limit
            return needed
        except (ValueError, OSError):
            pass
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


# ---- statistics ----
def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..1)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def rtt_ms(results: list[PhaseResult]) -> tuple[float, float]:
    samples = sorted(x for r in results for x in r.rtt_s)
    return percentile(samples, 0.50) * 1000, percentile(samples, 0.99) * 1000


# ---- the load generator processes ----
class LoadGenerator:
    """``workers`` processes of :func:`iwsproxy.tools.loadgen.worker_main`, driven phase by phase."""

    def __init__(self, workers: int):
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")  # nothing inherited from a parent with threads
        self._barrier = ctx.Barrier(workers + 1)
        self._results = ctx.Queue()
        self._commands = [ctx.Queue() for _ in range(workers)]
        self._procs = [ctx.Process(target=worker_main, args=(i, self._commands[i], self._results, self._barrier),
                                   name=f"loadgen-{i}", daemon=True) for i in range(workers)]

    def start(self) -> "LoadGenerator":
        for proc in self._procs:
            proc.start()
        threading.Thread(target=self._break_barrier_when_a_worker_dies, name="loadgen-watch", daemon=True).start()
        return self

    def _break_barrier_when_a_worker_dies(self) -> None:
        """A dead worker never reaches the barrier: break it at once, so that the parent's wait
        fails now instead of after BARRIER_TIMEOUT_S (at the end of a run, when the workers
        exit, nobody waits on it any more)."""
        multiprocessing.connection.wait([proc.sentinel for proc in self._procs])
        self._barrier.abort()

    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc.pid is not None]

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask every worker to exit, then terminate, then kill what is left."""
        for commands, proc in zip(self._commands, self._procs):
            if proc.is_alive():
                commands.put(None)
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            if proc.pid is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        for q in (*self._commands, self._results):
            q.close()
            q.cancel_join_thread()

    def run(self, phases: list[Phase], *, at_ready: Callable[[], None] | None = None,
            at_done: Callable[[], None] | None = None) -> list[PhaseResult]:
        """Run one phase per worker; ``at_ready`` runs with every connection open and no traffic,
        ``at_done`` after every worker reported, before the connections close."""
        assert len(phases) == self.workers
        longest = max(p.duration_s + DRAIN_TIMEOUT_S for p in phases)
        for commands, phase in zip(self._commands, phases):
            commands.put(phase)
        try:
            self._barrier.wait(BARRIER_TIMEOUT_S)  # ready
            if at_ready is not None:
                at_ready()
            self._barrier.wait(BARRIER_TIMEOUT_S)  # go
            results = [self._next_result(longest + RESULT_TIMEOUT_S) for _ in phases]
            failed = [r.error for r in results if r.error]
            if failed:
                raise BenchError("load generator failed:\n" + "\n".join(failed))
            if at_done is not None:
                at_done()
            self._barrier.wait(BARRIER_TIMEOUT_S)  # release: the workers close their connections
        except BrokenBarrierError:
            self._barrier.abort()
            raise BenchError("load generator failed:\n" + "\n".join(self._errors())) from None
        return sorted(results, key=lambda r: r.worker)

    def _next_result(self, timeout: float) -> PhaseResult:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise BenchError(f"load generator {dead[0].name} exited with code {dead[0].exitcode}") from None
                if time.monotonic() >= deadline:
                    raise BenchError(f"no result from the load generator within {timeout:.0f} s") from None

    def _errors(self) -> list[str]:
        errors = []
        for _ in self._procs:
            try:
                result = self._results.get(timeout=STOP_TIMEOUT_S)
            except queue.Empty:
                errors.append(f"(a worker reported nothing within {STOP_TIMEOUT_S:g} s: still connecting, or dead)")
                continue
            if result.error:
                errors.append(f"worker {result.worker}: {result.error}")
        return errors


# ---- paths ----
@dataclass
class PathUnderTest:
    """Where the connections of one path go, and which processes serve it (None: direct)."""

    name: str
    target: Callable[[int], Target]  # connection number -> where it goes
    backend_pids: list[int]
    server_pid: int | None = None

    def server_pids(self) -> list[int]:
        return process_tree(self.server_pid) if self.server_pid is not None else []


def _direct_path(backends: list[ChildProcess]) -> PathUnderTest:
    def target(i: int) -> Target:
        return Target(HOST, backends[i % len(backends)].port, "/bench")
    return PathUnderTest("direct", target, [b.proc.pid for b in backends])


def _proxy_path(name: str, server: ChildProcess, backends: list[ChildProcess]) -> PathUnderTest:
    def target(i: int) -> Target:
        return Target(HOST, server.port, "/" + str(uuid.uuid4()))  # a fresh client id per connection
    return PathUnderTest(name, target, [b.proc.pid for b in backends], server.proc.pid)


def _nginx_path(nginx: "NginxProcess", backends: list[ChildProcess]) -> PathUnderTest:
    def target(i: int) -> Target:
        return Target(HOST, nginx.port, "/bench")
    return PathUnderTest("nginx", target, [b.proc.pid for b in backends], nginx.proc.pid)


def _spread(path: PathUnderTest, n: int, workers: int) -> list[list[Target]]:
    """Connection i goes to worker i % workers and to ``path.target(i // workers)``: for the
    direct path each worker alternates between the backends, and the whole load is round robin."""
    per_worker: list[list[Target]] = [[] for _ in range(workers)]
    for i in range(n):
        per_worker[i % workers].append(path.target(i // workers))
    return per_worker


class _CpuMeter:
    """CPU seconds of the server (its process tree) and of the echo backends over one phase."""

    def __init__(self, path: PathUnderTest):
        self.path = path
        self.start: tuple[float, float, float] | None = None
        self.end: tuple[float, float, float] | None = None

    def _read(self) -> tuple[float, float, float]:
        server = cpu_seconds(self.path.server_pids()) if self.path.server_pid is not None else math.nan
        return time.perf_counter(), server, cpu_seconds(self.path.backend_pids)

    def at_ready(self) -> None:
        self.start = self._read()

    def at_done(self) -> None:
        self.end = self._read()

    @property
    def wall_s(self) -> float:
        return self.end[0] - self.start[0]

    @property
    def server_cpu_s(self) -> float:
        return self.end[1] - self.start[1]

    @property
    def backends_cpu_s(self) -> float:
        return self.end[2] - self.start[2]


@dataclass
class _Round:
    """One path's share of one round of a throughput scenario."""

    results: list[PhaseResult]  # one per load generator worker
    meter: _CpuMeter


def _phases(loadgen: LoadGenerator, path: PathUnderTest, kind: str, n: int, **kwargs) -> list[Phase]:
    return [Phase(kind, tuple(targets), **kwargs) for targets in _spread(path, n, loadgen.workers)]


def run_idle(loadgen: LoadGenerator, path: PathUnderTest, options: Options) -> PathResult:
    """The idle scenarios on one path: idle RTT, then memory per idle pipe (not direct)."""
    result = PathResult(path.name)
    servers = [pid for backend in path.backend_pids for pid in process_tree(backend)] + path.server_pids()
    with pinned(*([loadgen.pids(), servers] if options.pin else [])) as is_pinned:
        progress(f"{path.name}: idle RTT, {options.rtt_count} round trips"
                 + (", load generator and servers on two CPUs" if is_pinned else ""))
        rtt = loadgen.run(_phases(loadgen, path, "pingpong", 1, payload_bytes=RTT_BYTES, count=options.rtt_count))
    result.idle_p50_ms, result.idle_p99_ms = rtt_ms(rtt)
    result.notes["idle_rtt_pinned"] = is_pinned

    if path.server_pid is not None and options.idle_pipes:
        progress(f"{path.name}: {options.idle_pipes} idle pipes")
        rss: dict[str, int] = {"before": rss_kib(path.server_pids())}

        def after_quiet() -> None:
            time.sleep(options.idle_settle_s)  # ok-sleep: "idle" means quiet this long; not a synchronisation
            rss["after"] = rss_kib(path.server_pids())

        loadgen.run(_phases(loadgen, path, "idle", options.idle_pipes, payload_bytes=RTT_BYTES),
                    at_ready=after_quiet)
        result.rss_kib_per_pipe = (rss["after"] - rss["before"]) / options.idle_pipes
        result.notes["rss_kib_before"], result.notes["rss_kib_after"] = rss["before"], rss["after"]
    return result


def run_round(loadgen: LoadGenerator, path: PathUnderTest, scenario: str, options: Options) -> _Round:
    """One round of a throughput scenario (``small`` or ``large``) on one path."""
    seconds = options.duration_s / options.rounds
    if scenario == "small":
        n, size, window = options.connections, SMALL_BYTES, options.window
        progress(f"{path.name}: {n} connections x {size} B, window {window}, {seconds:g} s")
    else:
        n, size, window = options.large_connections, LARGE_BYTES, 1
        progress(f"{path.name}: {n} connections x 1 MiB, {seconds:g} s")
    meter = _CpuMeter(path)
    results = loadgen.run(_phases(loadgen, path, "window", n, payload_bytes=size, window=window, duration_s=seconds),
                          at_ready=meter.at_ready, at_done=meter.at_done)
    return _Round(results, meter)


def add_rounds(result: PathResult, scenario: str, rounds: list[_Round], options: Options) -> None:
    """Put one path's rounds of a scenario into its row: the mean over the rounds, each round's
    figure in ``result.rounds``, and where the CPU went (all rounds together)."""
    seconds = options.duration_s / options.rounds
    results = [r for rnd in rounds for r in rnd.results]
    wall = sum(rnd.meter.wall_s for rnd in rounds)
    server_cpu = sum(rnd.meter.server_cpu_s for rnd in rounds)  # nan for direct
    per_worker: dict[int, float] = {}
    for r in results:
        per_worker[r.worker] = per_worker.get(r.worker, 0.0) + r.cpu_s
    result.cpu_pct[scenario] = {
        "loadgen_busiest": max(per_worker.values()) / wall * 100,
        "loadgen_all": sum(per_worker.values()) / wall * 100,
        "echo_backends": sum(rnd.meter.backends_cpu_s for rnd in rounds) / wall * 100,
        "server": None if math.isnan(server_cpu) else server_cpu / wall * 100,
    }
    if scenario == "small":
        per_round = [sum(r.echoes for r in rnd.results) / seconds for rnd in rounds]
        result.small_msgs_per_s = sum(per_round) / len(per_round)
        result.small_p50_ms, result.small_p99_ms = rtt_ms(results)
        if not math.isnan(server_cpu):
            carried = sum(r.total_echoes for r in results)  # every round trip the server carried, drained ones too
            result.cpu_us_per_msg = server_cpu / carried * 1e6 if carried else None
            result.notes["server_cpu_s"] = round(server_cpu, 3)
            result.notes["messages_carried"] = carried
    else:
        per_round = [sum(r.echoed_bytes for r in rnd.results) / seconds / 1e6 for rnd in rounds]
        result.large_mb_per_s = sum(per_round) / len(per_round)
    result.rounds[scenario] = per_round


def in_turn(paths: list, round_number: int) -> list:
    """The order of the paths in round ``round_number``: each round starts one path later."""
    k = round_number % len(paths)
    return paths[k:] + paths[:k]


def run_paths(loadgen: LoadGenerator, paths: list[PathUnderTest], options: Options) -> list[PathResult]:
    """Every scenario on every path: the idle ones path after path, then the throughput ones in rounds."""
    results = {path.name: run_idle(loadgen, path, options) for path in paths}
    for scenario in ("small", "large"):
        rounds: dict[str, list[_Round]] = {path.name: [] for path in paths}
        for number in range(options.rounds):
            if options.rounds > 1:
                progress(f"{scenario} messages, round {number + 1} of {options.rounds}")
            for path in in_turn(paths, number):
                rounds[path.name].append(run_round(loadgen, path, scenario, options))
        for path in paths:
            add_rounds(results[path.name], scenario, rounds[path.name], options)
    return [results[path.name] for path in paths]


# ---- servers ----
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
                name: str = "proxy") -> ChildProcess:
    """``iwsproxy serve`` from the source tree ``root`` (this one by default)."""
    urls = [arg for b in backends for arg in ("--backend", b.url)]
    # --log-level belongs to the top-level parser: `iwsproxy --log-level warning serve ...`
    # one load generator address opens every pipe: lift the per-address and per-process caps
    limits = ["--max-pipes", "100000", "--max-pipes-per-ip", "100000"]
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


def start_gunicorn(backends: list[ChildProcess], workdir: Path, started: list) -> ChildProcess:
    config = workdir / "gunicorn.conf.py"
    config.write_text(_GUNICORN_CONFIG)
    proxy = ChildProcess("gunicorn", "-k", "iwsproxy.gunicorn.Worker", "-w", "1",
                         "-b", f"{HOST}:0", "-c", str(config), "--chdir", str(ROOT), "wsgi:app",
                         env=_child_env({"IWSPROXY_BACKENDS": ",".join(b.url for b in backends),
                                         "IWSPROXY_MAX_PIPES": "100000", "IWSPROXY_MAX_PIPES_PER_IP": "100000"}),
                         name="proxy-gunicorn")
    return _start(proxy, started, timeout=2 * START_TIMEOUT_S)


_NGINX_CONFIG = """\
# written by iwsproxy.tools.bench
daemon off;
master_process on;
worker_processes 1;
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

    def __init__(self, binary: str, backend_ports: list[int], workdir: Path, connections: int):
        self.binary = binary
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
                                               backlog=NGINX_BACKLOG, connections=self.connections,
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


# ---- output ----
def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def format_table(results: list[PathResult]) -> str:
    header = "| path | " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = [f"| {r.path} | " + " | ".join(_cell(getattr(r, key), fmt) for _, key, fmt in COLUMNS) + " |"
            for r in results]
    return "\n".join([header, rule, *rows])


_RATIOS = (("msg/s", "small_msgs_per_s", "small"), ("MB/s", "large_mb_per_s", "large"))


PROXY_PATHS = ("proxy", "proxy-base", "proxy-gunicorn")


def ratios(results: list[PathResult]) -> dict[str, float | None]:
    """Each proxy against direct and nginx: throughput ratios (of the means over the rounds) and
    the idle RTT it adds."""
    by = {r.path: r for r in results}

    def get(path: str, key: str) -> float | None:
        return getattr(by.get(path), key, None)

    out: dict[str, float | None] = {}
    for proxy in [p for p in PROXY_PATHS if p in by]:
        for other in ("direct", "nginx"):
            for unit, key, _ in _RATIOS:
                x, y = get(proxy, key), get(other, key)
                out[f"{proxy}/{other} {unit}"] = x / y if x is not None and y else None
        x, y = get(proxy, "idle_p50_ms"), get("direct", "idle_p50_ms")
        out[f"{proxy} idle p50 minus direct ms"] = x - y if x is not None and y is not None else None
    return out


def round_ratios(results: list[PathResult]) -> dict[str, list[float]]:
    """The throughput ratios of :func:`ratios` round by round (the paths of a round ran minutes
    apart at most, so these pairs saw the same machine)."""
    by = {r.path: r for r in results}
    out: dict[str, list[float]] = {}
    for proxy in [p for p in PROXY_PATHS if p in by]:
        for other in [p for p in ("direct", "nginx") if p in by]:
            for unit, _, scenario in _RATIOS:
                pairs = zip(by[proxy].rounds.get(scenario, ()), by[other].rounds.get(scenario, ()))
                out[f"{proxy}/{other} {unit}"] = [x / y for x, y in pairs if y]
    return out


def format_cpu(results: list[PathResult]) -> list[str]:
    """Where the CPU went during the throughput phases: a path limited by the load generator
    (busiest worker near 100 %) or by the echo backends would show it here."""
    lines = ["CPU use in % of one core (load generator busiest worker / all workers, echo backends, server):"]
    for phase, title in (("small", "small messages"), ("large", "1 MiB messages")):
        parts = []
        for r in results:
            c = r.cpu_pct.get(phase)
            if c:
                server = "-" if c["server"] is None else f"{c['server']:.0f}"
                parts.append(f"{r.path} {c['loadgen_busiest']:.0f}/{c['loadgen_all']:.0f}, "
                             f"{c['echo_backends']:.0f}, {server}")
        lines.append(f"- {title}: " + "; ".join(parts))
    return lines


def format_ratios(values: dict[str, float | None], per_round: dict[str, list[float]]) -> str:
    lines = []
    for name, value in values.items():
        if value is None:
            text = "n/a"
        elif name.endswith(" ms"):
            text = f"{value:+.3f} ms"
            name = name[:-3]
        else:
            text = f"{value:.3f}"
            rounds = per_round.get(name, [])
            if len(rounds) > 1:
                text += f" (rounds {min(rounds):.3f}-{max(rounds):.3f})"
        lines.append(f"- {name}: {text}")
    return "\n".join(lines)


# ---- the run ----
def run(options: Options) -> tuple[list[PathResult], dict]:
    needed = 2 * options.idle_pipes + 4 * options.connections + 64
    nofile = raise_nofile_limit(needed + 1024)
    if nofile != resource.RLIM_INFINITY and nofile < needed:
        progress(f"warning: RLIMIT_NOFILE is {nofile}; {options.idle_pipes} idle pipes need about {needed}")
    nginx_binary = shutil.which("nginx") if options.nginx else None
    if options.nginx and nginx_binary is None:
        progress("nginx not on PATH: skipping the nginx path")
    started: list[ChildProcess] = []
    loadgen = LoadGenerator(options.workers)
    nginx: NginxProcess | None = None
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="iwsproxy-bench-") as tmp:
        try:
            loadgen.start()
            backends = start_echo_backends(2, started)
            progress(f"echo backends on {', '.join(str(b.port) for b in backends)}; "
                     f"{options.workers} load generator processes")
            paths = [_direct_path(backends)]
            proxy = start_proxy(backends, started)
            progress(f"proxy: pid {proxy.proc.pid}, port {proxy.port}")
            paths.append(_proxy_path("proxy", proxy, backends))
            if options.compare_with is not None:
                base = start_proxy(backends, started, root=Path(options.compare_with).resolve(), name="proxy-base")
                progress(f"proxy-base ({options.compare_with}): pid {base.proc.pid}, port {base.port}")
                paths.append(_proxy_path("proxy-base", base, backends))
            if options.gunicorn:
                workdir = Path(tmp) / "gunicorn"
                workdir.mkdir()
                guni = start_gunicorn(backends, workdir, started)
                progress(f"proxy-gunicorn: master pid {guni.proc.pid}, port {guni.port}")
                paths.append(_proxy_path("proxy-gunicorn", guni, backends))
            if nginx_binary is not None:
                workdir = Path(tmp) / "nginx"
                workdir.mkdir()
                connections = 2 * max(options.idle_pipes, options.connections) + 256
                nginx = NginxProcess(nginx_binary, [b.port for b in backends], workdir, connections).start()
                progress(f"nginx: master pid {nginx.proc.pid}, port {nginx.port}")
                paths.append(_nginx_path(nginx, backends))
            try:
                results = run_paths(loadgen, paths, options)
            except BenchError as exc:
                if nginx is not None and nginx.stderr_text().strip():
                    raise BenchError(f"{exc}\nnginx stderr:\n{nginx.stderr_text()}") from None
                raise
        finally:
            if nginx is not None:
                nginx.terminate()
            loadgen.stop()
            for child in reversed(started):
                child.terminate()
    info = {"machine": machine_line(), "options": dataclasses.asdict(options),
            "elapsed_s": round(time.monotonic() - t0, 1), "nginx": nginx_binary,
            "nginx_version": _nginx_version(nginx_binary)}
    return results, info


def _nginx_version(binary: str | None) -> str | None:
    if binary is None:
        return None
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().rpartition("/")[2] or None


def report(results: list[PathResult], info: dict, options: Options) -> str:
    o = options
    pinning = (" (load generator and servers pinned to two CPUs)"
               if any(r.notes.get("idle_rtt_pinned") for r in results) else " (not pinned)")
    lines = [
        f"load: small {o.connections} conns x {SMALL_BYTES} B, window {o.window}; "
        f"large {o.large_connections} conns x 1 MiB, window 1; {o.duration_s:g} s each per path, in "
        f"{o.rounds} round{'s' if o.rounds > 1 else ''} with the paths in turn; "
        f"idle RTT {o.rtt_count} x {RTT_BYTES} B{pinning}; {o.idle_pipes} idle pipes (RSS after {o.idle_settle_s:g} s quiet); "
        f"{o.workers} load generator processes",
        "",
        format_table(results),
        "",
        format_ratios(ratios(results), round_ratios(results)),
        "",
        *format_cpu(results),
        "",
        info["machine"] + (f"; nginx {info['nginx_version']}" if info.get("nginx_version") else "")
        + f"; run took {info['elapsed_s']} s",
    ]
    return "\n".join(lines)


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through run()'s cleanup, which a plain SIGTERM would skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg == "--soak" or arg.startswith("--soak=") for arg in argv):  # a scenario of its own
        from iwsproxy.tools.soak import main as soak_main
        return soak_main([arg for arg in argv if arg != "--"])
    options = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # `timeout`, `kill`, a cancelled CI job
        signal.signal(signum, _exit_on_signal)
    try:
        results, info = run(options)
    except BenchError as exc:
        print(f"iwsproxy bench: {exc}", file=sys.stderr)
        return 1
    print(report(results, info, options), flush=True)
    if options.json_path:
        data = {**info, "results": [dataclasses.asdict(r) for r in results], "ratios": ratios(results),
                "round_ratios": round_ratios(results)}
        Path(options.json_path).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
