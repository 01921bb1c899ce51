"""``iwsproxy bench --soak SESSIONS``: short sessions served in rounds, and the proxy's memory after each.

::

    iwsproxy bench --soak 60000 [--gunicorn] [--round-sessions 500] [--messages 10]
                   [--resume-grace 1] [--every N] [--json PATH]

One echo backend (``python -m iwsproxy.tools.echo``) and the proxy (``iwsproxy serve``, or with
``--gunicorn`` one gunicorn gevent-websocket worker) with ``--resume-grace`` seconds of resume.
Each round opens ``--round-sessions`` sessions, each with a client id of its own, and keeps
them all open while each echoes ``--messages`` messages, one at a time (text and 200-byte
binary in turn; every echo is checked). Then half of them close with a Close frame (and wait
for the proxy's reply), the other half drop their TCP connection without one, so their
sessions are detached and end when the grace period runs out.

After each round, once the proxy reports no pipe left, the soak reads:

* the RSS and open file descriptors of the proxy's process tree (``/proc``),
* the proxy's Python live memory from ``GET /admin/status``: the allocator's blocks in use
  (``sys.getallocatedblocks()``) and the objects the garbage collector tracks.

A line is printed every ``--every`` rounds, then how much each grew over the last two thirds
of the run (from a third of the sessions to the end, e.g. 20,000 to 60,000), per session, with
the highest Python figures after a round before and after that point. A proxy that keeps
nothing per session shows flat Python figures and an RSS that levels off; sessions freed only
by the cyclic collector show as a saw whose teeth grow.

:func:`soak_rounds` runs the rounds against a proxy started by someone else (the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from iwsproxy.tools.bench import process_tree, raise_nofile_limit, rss_kib
from iwsproxy.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameParser, MaskSource, \
    encode_close_payload, encode_frame
from iwsproxy.tools.loadgen import TIMEOUT_SCALE, Target, open_websocket
from iwsproxy.tools.process import ChildProcess

__all__ = ["SoakError", "SoakOptions", "Sample", "soak_rounds", "run_soak", "main"]

HOST = "127.0.0.1"
BINARY_BYTES = 200
ROUND_TIMEOUT_S = 60.0 * TIMEOUT_SCALE    # for the echoes and closes of one round
SETTLE_TIMEOUT_S = 30.0 * TIMEOUT_SCALE   # beyond the grace period, for the proxy's pipes to end
START_TIMEOUT_S = 30.0 * TIMEOUT_SCALE
ADMIN_TOKEN = "iwsproxy-soak"
READ_CHUNK_BYTES = 64 * 1024
FDS_SETTLE_S = 1.0                        # see settled_fds


class SoakError(Exception):
    """The soak could not go on: a session failed, or the proxy's pipes did not end."""


@dataclass(frozen=True)
class SoakOptions:
    sessions: int
    round_sessions: int = 500
    messages: int = 10
    resume_grace_s: float = 1.0
    gunicorn: bool = False
    every: int = 0            # print a line every this many rounds (0: about 20 lines in all)
    json_path: str | None = None


@dataclass(frozen=True)
class Sample:
    """The proxy after a round, with none of its pipes left."""

    sessions: int             # sessions served so far
    rss_kib: int              # VmRSS of the proxy's process tree
    fds: int                  # open file descriptors of the proxy's process tree
    allocated_blocks: int     # sys.getallocatedblocks() in the proxy (the worker, under gunicorn)
    gc_objects: int           # len(gc.get_objects()) there
    elapsed_s: float          # since the soak began


# ---- one round, client side ----
class _Session:
    """One client of a round: its socket, parser and where its echoes stand."""

    __slots__ = ("sock", "drop", "parser", "expected", "sent", "closing")

    def __init__(self, sock: socket.socket, leftover: bytes, drop: bool):
        self.sock = sock
        self.drop = drop  # end by dropping the TCP connection (else with a Close)
        self.parser = FrameParser(expect_masked=False, max_message_size=64 * 1024)
        self.expected: tuple[int, bytes] | None = None
        self.sent = 0
        self.closing = False
        if leftover:
            self.parser.feed(leftover)  # nothing is expected before the first message: dropped


def _message(number: int, binary: bytes) -> tuple[int, bytes]:
    if number % 2:
        return OP_BINARY, binary
    return OP_TEXT, f"soak message {number}: grüße".encode()


def _open(port: int, n: int) -> list[_Session]:
    sessions: list[_Session] = []
    try:
        for index in range(n):
            sock, leftover = open_websocket(Target(HOST, port, "/" + str(uuid.uuid4())))
            sessions.append(_Session(sock, leftover, drop=bool(index % 2)))
    except BaseException:
        for session in sessions:
            session.sock.close()
        raise
    return sessions


def _send_next(session: _Session, masks: MaskSource, binary: bytes) -> None:
    session.expected = _message(session.sent, binary)
    session.sent += 1
    session.sock.sendall(encode_frame(session.expected[0], session.expected[1], mask_source=masks))


def _exchange(sessions: list[_Session], messages: int, deadline: float) -> None:
    """Every session echoes ``messages`` messages, one at a time, all sessions at once; then each
    either sends a Close and waits for the reply (or EOF), or just closes its socket (``drop``)."""
    masks = MaskSource()
    binary = os.urandom(BINARY_BYTES)
    with selectors.DefaultSelector() as selector:
        for session in sessions:
            session.sock.settimeout(ROUND_TIMEOUT_S)  # sends wait at most this; reads follow the selector
            selector.register(session.sock, selectors.EVENT_READ, session)
            _send_next(session, masks, binary)
        busy = len(sessions)
        while busy:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SoakError(f"{busy} of {len(sessions)} sessions did not finish within {ROUND_TIMEOUT_S:g} s")
            for key, _ in selector.select(remaining):
                session = key.data
                if _on_readable(session, masks, messages, binary):
                    selector.unregister(session.sock)
                    session.sock.close()
                    busy -= 1


def _on_readable(session: _Session, masks: MaskSource, messages: int, binary: bytes) -> bool:
    """Handle what arrived; True once the session is over (Close answered, or EOF while closing)."""
    data = session.sock.recv(READ_CHUNK_BYTES)
    if not data:
        if session.closing:
            return True
        raise SoakError(f"the proxy closed a session after {session.sent} of {messages} messages")
    for opcode, payload in session.parser.feed(data):
        if opcode == OP_PING:
            session.sock.sendall(encode_frame(OP_PONG, payload, mask_source=masks))
        elif opcode == OP_CLOSE:
            if session.closing:
                return True
            raise SoakError(f"the proxy closed a session: {payload[:2].hex()} {payload[2:]!r}")
        elif opcode == OP_PONG:
            continue
        elif (opcode, payload) != session.expected:
            raise SoakError(f"wrong echo: opcode {opcode}, {payload[:40]!r}, expected {session.expected!r:.60}")
        elif session.sent < messages:
            _send_next(session, masks, binary)
        elif session.drop:  # no Close: the proxy sees the connection drop and detaches the session
            return True
        else:
            session.closing = True
            session.sock.sendall(encode_frame(OP_CLOSE, encode_close_payload(1000), mask_source=masks))
    return False


def run_round(port: int, n: int, messages: int) -> None:
    """One round against the proxy on ``port``: ``n`` sessions opened, used and closed (see the module)."""
    sessions = _open(port, n)
    try:
        _exchange(sessions, messages, time.monotonic() + ROUND_TIMEOUT_S)
    finally:
        for session in sessions:
            session.sock.close()


# ---- the proxy's side ----
def admin_status(port: int, token: str = ADMIN_TOKEN) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://{HOST}:{port}/admin/status",
                                     headers={"Authorization": f"Bearer {token}"})
    with opener.open(request, timeout=10 * TIMEOUT_SCALE) as response:
        return json.loads(response.read())


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except FileNotFoundError:
            pass  # exited meanwhile
    return total


def settled_fds(pids: list[int], baseline: int | None, timeout_s: float = FDS_SETTLE_S) -> int:
    """The open fds of ``pids``: while more than ``baseline`` (None: any number), looked at again
    for up to ``timeout_s``, and the fewest seen. The server may not yet have closed the socket of
    an admin request it has just answered; a leaked descriptor stays, and is counted."""
    deadline = time.monotonic() + timeout_s
    fewest = open_fds(pids)
    while baseline is not None and fewest > baseline and time.monotonic() < deadline:
        time.sleep(0.01)  # ok-sleep: between looks at another process's descriptors (bounded)
        fewest = min(fewest, open_fds(pids))
    return fewest


def settle(port: int, timeout_s: float, token: str = ADMIN_TOKEN) -> dict:
    """The proxy's ``/admin/status`` once it reports no pipe (SoakError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        status = admin_status(port, token)
        if status["pipes"] == 0:
            return status
        if time.monotonic() >= deadline:
            raise SoakError(f"{status['pipes']} pipes still open {timeout_s:g} s after the round")
        time.sleep(delay)  # ok-sleep: backoff between looks at another process's pipe count (bounded)
        delay = min(delay * 2, 0.25)


def soak_rounds(port: int, server_pid: int, rounds: int, *, round_sessions: int = 500, messages: int = 10,
                resume_grace_s: float = 1.0, token: str = ADMIN_TOKEN, baseline_fds: int | None = None,
                on_sample=None) -> list[Sample]:
    """Run ``rounds`` rounds against the proxy on ``port`` (its admin token ``token``, its process
    tree rooted at ``server_pid``) and return one :class:`Sample` per round; ``on_sample(sample)``
    is called after each. Open fds are read as :func:`settled_fds` does, against ``baseline_fds``
    (None: the first round's count). Raises SoakError (a session failed, pipes did not end) or
    OSError."""
    started = time.monotonic()
    samples: list[Sample] = []
    for number in range(1, rounds + 1):
        run_round(port, round_sessions, messages)
        status = settle(port, resume_grace_s + SETTLE_TIMEOUT_S, token)
        pids = process_tree(server_pid)
        fds = settled_fds(pids, baseline_fds)
        baseline_fds = fds if baseline_fds is None else baseline_fds
        sample = Sample(sessions=number * round_sessions, rss_kib=rss_kib(pids), fds=fds,
                        allocated_blocks=status["memory"]["allocated_blocks"],
                        gc_objects=status["memory"]["gc_objects"], elapsed_s=time.monotonic() - started)
        samples.append(sample)
        if on_sample is not None:
            on_sample(sample)
    return samples


# ---- the command ----
def parse_args(argv: list[str]) -> SoakOptions:
    parser = argparse.ArgumentParser(prog="iwsproxy bench --soak", description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("--soak", type=int, required=True, metavar="SESSIONS", help="sessions to serve in all")
    parser.add_argument("--round-sessions", type=int, default=500, help="sessions open at once, per round (500)")
    parser.add_argument("--messages", type=int, default=10, help="messages each session echoes (10)")
    parser.add_argument("--resume-grace", type=float, default=1.0,
                        help="the proxy's --resume-grace: how long a dropped session lives on (1 s)")
    parser.add_argument("--gunicorn", action="store_true", help="the proxy under gunicorn (one worker)")
    parser.add_argument("--every", type=int, default=0, help="print a line every N rounds (default: about 20 lines)")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write every sample as JSON")
    args = parser.parse_args(argv)
    if args.soak < 1 or args.round_sessions < 1 or args.messages < 1 or args.resume_grace < 0 or args.every < 0:
        parser.error("--soak, --round-sessions and --messages must be at least 1, --resume-grace and --every "
                     "not negative")
    return SoakOptions(sessions=args.soak, round_sessions=args.round_sessions, messages=args.messages,
                       resume_grace_s=args.resume_grace, gunicorn=args.gunicorn, every=args.every,
                       json_path=args.json_path)


def _progress(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def start_server(options: SoakOptions, backend: ChildProcess) -> ChildProcess:
    """The proxy in front of ``backend``, with resume on and the soak's admin token (not started)."""
    limits = {"IWSPROXY_MAX_PIPES": "100000", "IWSPROXY_MAX_PIPES_PER_IP": "100000"}
    env = {**limits, "IWSPROXY_BACKENDS": backend.url, "IWSPROXY_ADMIN_TOKEN": ADMIN_TOKEN,
           "IWSPROXY_RESUME_GRACE": f"{options.resume_grace_s:g}", "IWSPROXY_LOG_LEVEL": "warning"}
    if options.gunicorn:
        return ChildProcess("gunicorn", "-k", "geventwebsocket.gunicorn.workers.GeventWebSocketWorker", "-w", "1",
                            "-b", f"{HOST}:0", "-c", "python:iwsproxy.gunicorn_conf", "--log-level", "warning",
                            "--chdir", str(Path(__file__).resolve().parent.parent), "wsgi:app",
                            env=env, name="proxy-gunicorn")
    return ChildProcess("iwsproxy", "serve", "--bind", f"{HOST}:0", env=env, name="proxy")


def _line(sample: Sample) -> str:
    return (f"{sample.sessions:>9,} | {sample.rss_kib / 1024:8.1f} | {sample.fds:4d} "
            f"| {sample.allocated_blocks:>10,} | {sample.gc_objects:>9,} | {sample.elapsed_s:7.0f}")


def summary(samples: list[Sample], baseline_fds: int) -> list[str]:
    """Growth from a third of the sessions to the end (20,000 to 60,000 of 60,000), in all and per
    session, and the open fds after every round against ``baseline_fds`` (before the first session).

    Python's live memory goes up and down with the garbage the cyclic collector has yet to find,
    so its highest value after a round is given for either part too: a leak of reference cycles
    shows as a saw whose teeth grow."""
    last = samples[-1]
    start = next(s for s in samples if s.sessions >= last.sessions / 3)
    served = last.sessions - start.sessions
    first, rest = samples[:samples.index(start) + 1], samples[samples.index(start):]

    def growth(name: str, key: str, unit: str) -> str:
        a, b = getattr(start, key), getattr(last, key)
        per = f" ({(b - a) / served:+.3f} {unit} per session)" if served else ""
        peaks = f"; highest after a round: {max(getattr(s, key) for s in first):,} up to {start.sessions:,} " \
                f"sessions, {max(getattr(s, key) for s in rest):,} from there on"
        return f"- {name} {a:,} -> {b:,}: {b - a:+,}{per}{peaks}"

    rss = last.rss_kib - start.rss_kib
    fds = sorted({s.fds for s in samples})
    return [
        f"from {start.sessions:,} to {last.sessions:,} sessions:",
        f"- RSS {start.rss_kib / 1024:.1f} -> {last.rss_kib / 1024:.1f} MiB: {rss / 1024:+.1f} MiB"
        + (f" ({rss / served:+.3f} KiB per session)" if served else ""),
        growth("allocated blocks", "allocated_blocks", "blocks"),
        growth("gc objects", "gc_objects", "objects"),
        f"- open fds after each round: {fds[0]}" + (f"-{fds[-1]}" if len(fds) > 1 else "")
        + f" (before the first session: {baseline_fds})",
    ]


def run_soak(options: SoakOptions) -> list[Sample]:
    rounds = max(1, -(-options.sessions // options.round_sessions))
    every = options.every or max(1, rounds // 20)
    raise_nofile_limit(4 * options.round_sessions + 256)
    backend = ChildProcess("iwsproxy.tools.echo", "--port", "0", "--host", HOST, "--name", "echo", name="echo")
    server = None
    try:
        backend.start(START_TIMEOUT_S)
        server = start_server(options, backend)
        server.start(START_TIMEOUT_S)
        kind = "gunicorn, one worker" if options.gunicorn else "iwsproxy serve"
        _progress(f"proxy ({kind}) pid {server.proc.pid} port {server.port}; {rounds} rounds of "
                  f"{options.round_sessions} sessions x {options.messages} messages, resume grace "
                  f"{options.resume_grace_s:g} s")
        settle(server.port, SETTLE_TIMEOUT_S)  # answered: the proxy (gunicorn's worker) is up
        pids = process_tree(server.proc.pid)
        baseline = {"rss_kib": rss_kib(pids), "fds": settled_fds(pids, 0)}  # the fewest within FDS_SETTLE_S
        print(f"before the first session: RSS {baseline['rss_kib'] / 1024:.1f} MiB, {baseline['fds']} fds",
              flush=True)
        print(" sessions | RSS MiB  |  fds | alloc blocks | gc objects | seconds", flush=True)

        def on_sample(sample: Sample) -> None:
            number = sample.sessions // options.round_sessions
            if number == 1 or number % every == 0 or number == rounds:
                print(_line(sample), flush=True)

        samples = soak_rounds(server.port, server.proc.pid, rounds, round_sessions=options.round_sessions,
                              messages=options.messages, resume_grace_s=options.resume_grace_s,
                              baseline_fds=baseline["fds"], on_sample=on_sample)
    finally:
        if server is not None:
            server.terminate()
        backend.terminate()
    print("\n".join(summary(samples, baseline["fds"])), flush=True)
    if options.json_path:
        data = {"options": asdict(options), "before": baseline, "samples": [asdict(s) for s in samples]}
        Path(options.json_path).write_text(json.dumps(data, indent=2) + "\n")
    return samples


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    try:
        run_soak(options)
    except (SoakError, RuntimeError, OSError) as exc:
        print(f"iwsproxy bench --soak: {exc}", file=sys.stderr)
        return 1
    return 0
