"""The benchmark's output: the table, the ratios between paths, where the CPU went.

Server CPU per message is the figure that survives a busy machine: the CPU time
of a path's server (its whole process tree; for ``direct``, the echo backends)
over the round trips it carried. Messages per second per busy core is its
reciprocal (carried round trips over CPU seconds): the rate one core would carry
if the server had it to itself, which is what several workers can multiply.
"server cores busy" is the server's CPU time over the phase's wall time: below
its process count, the server was not the bottleneck (the load generator or the
machine's other load was), and its message rate says little about the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["PathResult", "COLUMNS", "PROXY_PATHS", "format_table", "ratios", "round_ratios", "format_cpu",
           "format_ratios"]

COLUMNS = (
    ("small msg/s", "small_msgs_per_s", "{:.0f}"),
    ("small p50 ms", "small_p50_ms", "{:.3f}"),
    ("small p99 ms", "small_p99_ms", "{:.3f}"),
    ("server CPU us/msg", "cpu_us_per_msg", "{:.2f}"),
    ("server cores busy", "server_cores", "{:.2f}"),
    ("msg/s per busy core", "msgs_per_core_s", "{:.0f}"),
    ("1 MiB MB/s", "large_mb_per_s", "{:.1f}"),
    ("idle RTT p50 ms", "idle_p50_ms", "{:.3f}"),
    ("idle RTT p99 ms", "idle_p99_ms", "{:.3f}"),
    ("RSS KiB/idle pipe", "rss_kib_per_pipe", "{:.1f}"),
)


@dataclass
class PathResult:
    """One row of the table; None where a measurement does not apply."""

    path: str
    small_msgs_per_s: float | None = None
    small_p50_ms: float | None = None
    small_p99_ms: float | None = None
    cpu_us_per_msg: float | None = None    # the server's (direct: the echo backends') CPU per round trip
    server_cores: float | None = None      # its CPU time over the small phase's wall time
    msgs_per_core_s: float | None = None   # round trips per CPU second: 1e6 / cpu_us_per_msg
    large_mb_per_s: float | None = None
    idle_p50_ms: float | None = None
    idle_p99_ms: float | None = None
    rss_kib_per_pipe: float | None = None
    # phase -> who -> CPU use in % of one core: where the time went, so a bottleneck
    # other than the server under test (the generator, the echo backends) shows
    cpu_pct: dict = field(default_factory=dict)
    # scenario -> its figure in each round, in round order (small: msg/s, large: MB/s,
    # small_cpu_us: CPU us per message, small_per_core: msg/s per busy core)
    rounds: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def format_table(results: list[PathResult]) -> str:
    header = "| path | " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = [f"| {r.path} | " + " | ".join(_cell(getattr(r, key), fmt) for _, key, fmt in COLUMNS) + " |"
            for r in results]
    return "\n".join([header, rule, *rows])


_RATIOS = (("msg/s", "small_msgs_per_s", "small"), ("MB/s", "large_mb_per_s", "large"))
_CPU_RATIOS = (("CPU us/msg", "cpu_us_per_msg", "small_cpu_us"),
               ("msg/s per busy core", "msgs_per_core_s", "small_per_core"))


def _compared(other: str) -> tuple:
    """The figures compared with ``other``: throughput with every path, CPU with nginx only (the
    direct path's CPU is the echo backends', a different job)."""
    return _RATIOS + _CPU_RATIOS if other == "nginx" else _RATIOS


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
            for unit, key, _ in _compared(other):
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
            for unit, _, scenario in _compared(other):
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
