"""The benchmark runs end to end in its quick mode, gunicorn path included, and prints its table
(no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 60
HEADER = ("| path | small msg/s | small p50 ms | small p99 ms | proxy CPU us/msg | 1 MiB MB/s "
          "| idle RTT p50 ms | idle RTT p99 ms | RSS KiB/idle pipe |")


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
    run = subprocess.run([sys.executable, "-m", "iwsproxy.bench", "--quick", "--no-nginx", "--gunicorn",
                          "--json", str(json_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    lines = run.stdout.splitlines()
    assert HEADER in lines, run.stdout

    rows = {_cells(line)[0]: _cells(line)[1:] for line in lines if line.startswith("| ") and line != HEADER}
    assert set(rows) == {"direct", "proxy", "proxy-gunicorn"}, run.stdout
    for path in ("proxy", "proxy-gunicorn"):  # every cell measured, RSS per idle pipe included
        assert len(rows[path]) == 8 and all(_is_number(cell) for cell in rows[path]), rows[path]
    assert any(line.startswith("- proxy/direct msg/s: ") for line in lines), run.stdout
    assert any(line.startswith("machine: nproc ") for line in lines), run.stdout

    data = json.loads(json_path.read_text())
    assert [r["path"] for r in data["results"]] == ["direct", "proxy", "proxy-gunicorn"]
