"""Reading processes from /proc for the benchmark and the soak: process trees, CPU time, RSS,
CPU pinning, and the machine's description."""

from __future__ import annotations

import os
import platform
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["process_tree", "cpu_seconds", "pinned", "rss_kib", "machine_line", "raise_nofile_limit"]


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
