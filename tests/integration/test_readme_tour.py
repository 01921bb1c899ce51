"""The README's five-minute tour, run as written: its shell commands and its Python session, with
the outputs it shows.

The tour's fixed ports (backends 9001 and 9002, the proxy 8080) become ports chosen by the system;
everything else is taken from the README's code blocks, so the tour cannot drift from the code.
"""

from __future__ import annotations

import doctest
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import websocket

from iwsproxy.tools.process import ChildProcess

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
ECHO_RE = re.compile(r"python -m iwsproxy\.tools\.echo --port (\d+) --name (\w+) &$")
KILL_RE = re.compile(r"kill -9 \$\(pgrep -f 'echo --port (\d+)'\)$")


def tour_blocks() -> list[tuple[str, str]]:
    """(language, text) of each code block of the README's tour section, in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w*)\n(.*?)```", section, re.S)


class Tour:
    """The tour's processes, and the README's ports mapped to the ones they got."""

    def __init__(self, start_block: str, processes):
        self.processes = processes
        self.ports: dict[str, str] = {}
        self.echoes: dict[str, ChildProcess] = {}
        serve = None
        for line in start_block.strip().splitlines():
            match = ECHO_RE.match(line)
            if match:
                self.start_echo(match.group(1), match.group(2), port="0")
            elif line.startswith("iwsproxy serve "):
                serve = shlex.split(self.local(line))[2:]
            else:
                raise AssertionError(f"the tour starts with a command this test does not know: {line}")
        assert serve is not None, "the tour's first block starts no proxy"
        self.proxy = processes.add(ChildProcess("iwsproxy", "serve", "--bind", "127.0.0.1:0", *serve, name="proxy"))
        self.ports["8080"] = str(self.proxy.port)

    def start_echo(self, readme_port: str, name: str, port: str) -> None:
        echo = self.processes.add(ChildProcess("iwsproxy.tools.echo", "--port", port, "--name", name, name=name))
        self.ports[readme_port] = str(echo.port)
        self.echoes[readme_port] = echo

    def local(self, text: str) -> str:
        """``text`` with the README's ports replaced by this run's."""
        return re.sub(r"127\.0\.0\.1:(\d+)", lambda m: "127.0.0.1:" + self.ports.get(m.group(1), m.group(1)), text)

    def shell(self, block: str) -> None:
        """Run each ``$ command`` of a block and compare what it prints with the lines after it."""
        steps = re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", block, re.M)
        assert steps, f"a shell block of the tour without a $ command:\n{block}"
        for command, expected in steps:
            assert self.run(command) == self.local(expected), f"$ {command}"

    def run(self, command: str) -> str:
        echo, kill = ECHO_RE.match(command), KILL_RE.match(command)
        if echo:  # the killed backend again, on its port
            self.start_echo(echo.group(1), echo.group(2), port=self.ports[echo.group(1)])
            return ""
        if kill:
            self.echoes[kill.group(1)].kill()
            return ""
        if command.startswith("iwsproxy backends "):
            argv = [sys.executable, "-m", "iwsproxy", *shlex.split(self.local(command))[1:],
                    "--admin", f"{self.proxy.http_url}/admin"]
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            return result.stdout
        raise AssertionError(f"the tour runs a command this test does not know: {command}")


@pytest.mark.timeout(90)
def test_the_readme_tour_runs_as_written(processes):
    blocks = tour_blocks()
    assert [lang for lang, _ in blocks] == ["sh", "python", "sh", "python", "sh", "python", "python"]
    tour = Tour(blocks[0][1], processes)
    websocket.setdefaulttimeout(10)  # a recv that the README expects to return does, or fails the test
    session: dict = {}
    runner = doctest.DocTestRunner(verbose=False)
    report: list[str] = []
    try:
        for lang, text in blocks[1:]:
            if lang == "sh":
                tour.shell(text)
                continue
            test = doctest.DocTestParser().get_doctest(tour.local(text), session, "README tour", str(README), 0)
            test.globs = session  # one namespace for the whole session, as in the REPL (DocTest copies it)
            runner.run(test, out=report.append, clear_globs=False)
            assert runner.failures == 0, "".join(report)
    finally:
        websocket.setdefaulttimeout(None)
        ws = session.get("ws")
        if ws is not None:
            ws.close(timeout=1)
