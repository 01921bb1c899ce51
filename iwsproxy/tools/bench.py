"""``iwsproxy bench``: the same load direct, through the proxy (and nginx), in one run.

::

    python -m iwsproxy.tools.bench [--quick] [--duration S] [--rounds R] [--connections N] [--window W]
                             [--idle-pipes M] [--proxy-workers P] [--no-nginx] [--gunicorn] [--no-pin]
                             [--json PATH]

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
   (user+sys from /proc, its whole process tree; for ``direct``, the echo backends') divided by
   the round trips it carried (one round trip = one message), its reciprocal, messages per
   second per busy core, and the cores it kept busy; both CPU figures are compared with
   nginx's in the same run. On a machine where the load generator competes with the server
   for the cores, message rates and their ratios say more about the machine than about the
   server; CPU per message does not depend on how many cores the server got;
4. large messages: ``--large-connections`` connections, 1 MiB binary messages one at a time:
   echoed payload bytes per second (MB = 10**6 bytes).

``--proxy-workers P`` runs every server with P processes (``iwsproxy serve --workers P``,
``gunicorn -w P``, nginx ``worker_processes P``): run it with 1 and with 2 to see how the
proxy scales where there are cores to spare for it.

The load comes from :mod:`iwsproxy.tools.loadgen` worker processes (raw sockets, the
project's codec, ``selectors``). After the table, the CPU use of the load
generator, the echo backends and the server during each throughput phase is
printed: a path limited by the generator shows a busiest worker near 100 %, a
path limited by the server under test shows the server near 100 % per process (a
server of one process, 100 % is all it can use).

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
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from threading import BrokenBarrierError

from iwsproxy.tools.bench_report import (PathResult, format_cpu, format_ratios, format_table, ratios,
                                         round_ratios)
from iwsproxy.tools.bench_servers import (HOST, BenchError, NginxProcess, start_echo_backends, start_gunicorn,
                                          start_proxy)
from iwsproxy.tools.loadgen import (BARRIER_TIMEOUT_S, DRAIN_TIMEOUT_S, TIMEOUT_SCALE, Phase, PhaseResult,
                                    Target, worker_main)
from iwsproxy.tools.process import ChildProcess
from iwsproxy.tools.procfs import (cpu_seconds, machine_line, pinned, process_tree, raise_nofile_limit,  # noqa: F401
                                   rss_kib)

__all__ = ["Options", "PathResult", "BenchError", "LoadGenerator", "run", "main"]

SMALL_BYTES = 100
LARGE_BYTES = 1024 * 1024
RTT_BYTES = 32
RESULT_TIMEOUT_S = 120.0 * TIMEOUT_SCALE  # beyond the phase's own length
STOP_TIMEOUT_S = 5.0 * TIMEOUT_SCALE


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
    proxy_workers: int = 1    # iwsproxy serve --workers, gunicorn -w and nginx worker_processes
    nginx: bool = True
    gunicorn: bool = False
    compare_with: str | None = None  # a source tree whose proxy runs as the path "proxy-base"
    pin: bool = True
    json_path: str | None = None
    quick: bool = False



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
    parser.add_argument("--proxy-workers", type=int,
                        help="processes of each server: the proxy with --workers N, gunicorn with -w N, nginx with "
                             "worker_processes N (default 1); proxy-base is always run with one")
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
        proxy_workers=args.proxy_workers if args.proxy_workers is not None else 1,
        nginx=not args.no_nginx,
        gunicorn=args.gunicorn,
        compare_with=args.compare_with,
        pin=not args.no_pin,
        json_path=args.json_path,
        quick=quick,
    )
    for name in ("rounds", "connections", "window", "large_connections", "rtt_count", "workers", "proxy_workers"):
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
        direct = math.isnan(server_cpu)  # the direct path's server is the echo backends

        def cpu_of(rnd: _Round) -> float:
            return rnd.meter.backends_cpu_s if direct else rnd.meter.server_cpu_s

        cpu = sum(cpu_of(rnd) for rnd in rounds)
        carried = sum(r.total_echoes for r in results)  # every round trip the server carried, drained ones too
        if carried and cpu > 0:
            result.cpu_us_per_msg = cpu / carried * 1e6
            result.msgs_per_core_s = carried / cpu
            result.server_cores = cpu / wall
            result.rounds["small_cpu_us"] = [cpu_of(rnd) / n * 1e6 for rnd, n in _carried(rounds) if n]
            result.rounds["small_per_core"] = [n / cpu_of(rnd) for rnd, n in _carried(rounds) if cpu_of(rnd) > 0]
        result.notes["server_cpu_s"] = round(cpu, 3)
        result.notes["server_cpu_of"] = "echo backends" if direct else "server process tree"
        result.notes["messages_carried"] = carried
    else:
        per_round = [sum(r.echoed_bytes for r in rnd.results) / seconds / 1e6 for rnd in rounds]
        result.large_mb_per_s = sum(per_round) / len(per_round)
    result.rounds[scenario] = per_round


def _carried(rounds: list[_Round]) -> list[tuple[_Round, int]]:
    """Each round with the round trips carried in it."""
    return [(rnd, sum(r.total_echoes for r in rnd.results)) for rnd in rounds]


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
            proxy = start_proxy(backends, started, workers=options.proxy_workers)
            progress(f"proxy: pid {proxy.proc.pid}, port {proxy.port}")
            paths.append(_proxy_path("proxy", proxy, backends))
            if options.compare_with is not None:
                base = start_proxy(backends, started, root=Path(options.compare_with).resolve(), name="proxy-base")
                progress(f"proxy-base ({options.compare_with}): pid {base.proc.pid}, port {base.port}")
                paths.append(_proxy_path("proxy-base", base, backends))
            if options.gunicorn:
                workdir = Path(tmp) / "gunicorn"
                workdir.mkdir()
                guni = start_gunicorn(backends, workdir, started, workers=options.proxy_workers)
                progress(f"proxy-gunicorn: master pid {guni.proc.pid}, port {guni.port}")
                paths.append(_proxy_path("proxy-gunicorn", guni, backends))
            if nginx_binary is not None:
                workdir = Path(tmp) / "nginx"
                workdir.mkdir()
                connections = 2 * max(options.idle_pipes, options.connections) + 256
                nginx = NginxProcess(nginx_binary, [b.port for b in backends], workdir, connections,
                                     workers=options.proxy_workers).start()
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
        f"{o.workers} load generator processes; {o.proxy_workers} process{'es' if o.proxy_workers > 1 else ''} "
        f"per server (proxy --workers, gunicorn -w, nginx worker_processes)",
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