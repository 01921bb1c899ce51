"""The core stays pure because this checks it: importing it loads no I/O library."""

import subprocess
import sys

import pytest

PURE = ["iwsproxy.buffer", "iwsproxy.policy", "iwsproxy.tokens", "iwsproxy.session", "iwsproxy.states", "iwsproxy.actions",
        "iwsproxy.snapshot", "iwsproxy.masking", "iwsproxy.pool", "iwsproxy.backoff", "iwsproxy.frames",
        "iwsproxy.settings", "iwsproxy.clientid", "iwsproxy.routes", "iwsproxy.exceptions", "iwsproxy"]
IO = ["gevent", "geventwebsocket", "socket", "flask", "werkzeug", "websocket", "ssl"]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module):
    code = (f"import sys, {module}; bad = [m for m in {IO!r} if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{module} imported {result.stdout.strip()} {result.stderr}"


def test_the_proxy_does_not_import_its_tooling():
    """The benchmark, demo and echo backend live in iwsproxy.tools, which serving never loads."""
    code = ("import sys, iwsproxy.cli, iwsproxy.app, iwsproxy.io.server; iwsproxy.app.create_app(); "
            "bad = sorted(m for m in sys.modules if m.startswith('iwsproxy.tools')); "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"serving imported {result.stdout.strip()} {result.stderr}"
