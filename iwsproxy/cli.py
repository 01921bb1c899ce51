"""Command line: ``iwsproxy serve | demo | backends | bench``."""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import logging
import os
import sys
import urllib.error
import urllib.request

from .exceptions import ConfigError
from .settings import Settings, describe

__all__ = ["main"]

HANDOVER_ENV = "IWSPROXY_HANDOVER_FD"  # = iwsproxy.io.handover.ENV_CHANNEL (not imported: it imports gevent)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Settings):
        flag = f.metadata.get("flag")
        if not flag:
            continue
        help_text = f"{f.metadata['help']} (env {f.metadata['env']})"
        if f.type in ("bool",) or isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def _settings_from(args: argparse.Namespace) -> Settings:
    cli = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name, None) is not None}
    return Settings.load(env=os.environ, cli=cli)


def _configure_logging(level: str, *, with_pid: bool = False) -> None:
    pid = " [%(process)d]" if with_pid else ""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s{pid} %(levelname)s %(name)s: %(message)s")


def _ready(port: int) -> None:
    print(f"LISTENING {port}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """One process (monkey-patched here, first thing), or a master and ``--workers`` workers."""
    settings = _settings_from(args)
    if args.print_config:
        for name, env, value, help_text in describe(settings):
            print(f"{name:24} {value!r:40} {env}")
        return 0
    if settings.workers > 1:
        _configure_logging(args.log_level, with_pid=True)
        if os.environ.get(HANDOVER_ENV):  # started by a SIGHUP restart: the predecessor serves on
            logging.getLogger(__name__).error("a restart cannot turn one process into a master of %d workers: "
                                              "stop it and start it again", settings.workers)
            return 1
        return _serve_workers(settings)
    from gevent import monkey

    monkey.patch_all()
    from .app import create_app
    from .io.server import serve_forever, tune_process

    tune_process()
    _configure_logging(args.log_level)
    serve_forever(create_app(settings), settings.bind_address, ready=_ready)
    return 0


def _serve_workers(settings) -> int:
    """The master of ``settings.workers`` workers (see :mod:`iwsproxy.io.workers`); its exit status."""
    from functools import partial

    from .io.workers import Master, private_handoff_dir, remove_dir, serve_worker

    created = None
    if not settings.handoff_dir:
        created = private_handoff_dir()
        logging.getLogger(__name__).info("handoff directory %s (private, removed at exit)", created)
        settings = dataclasses.replace(settings, handoff_dir=created)
    try:
        master = Master(settings.workers, settings.bind_address, partial(serve_worker, settings),
                        backends=settings.backends, ready=_ready)
        return master.run()
    finally:
        if created is not None:
            remove_dir(created)


def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo
    return run_demo(messages=args.messages)


def _admin_call(args: argparse.Namespace, method: str, body: dict | None = None) -> dict:
    url = args.admin.rstrip("/") + "/backends"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {args.token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        raise SystemExit(f"iwsproxy: admin API answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"iwsproxy: cannot reach the admin API at {url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # a reset, a timeout, a half answer
        raise SystemExit(f"iwsproxy: no answer from the admin API at {url}: {exc or type(exc).__name__}") from None
    except ValueError:  # not JSON: not the admin API (a wrong --admin URL?)
        raise SystemExit(f"iwsproxy: {url} did not answer as the admin API does (JSON); check --admin") from None


def cmd_backends(args: argparse.Namespace) -> int:
    if args.action == "list":
        result = _admin_call(args, "GET")
        if args.pool is not None and args.pool not in result.get("pools", [args.pool]):
            raise SystemExit(f"iwsproxy: no pool {args.pool!r}; this proxy's pools: {', '.join(result['pools'])}")
        for b in result.get("backends", []):
            if args.pool is None or b.get("pool", "default") == args.pool:
                print(f"{b['url']}\t{b['state']}\tpool={b.get('pool', 'default')}\tclients={b['clients']}"
                      f"\tfailures={b['total_failures']}")
        return 0
    if not args.url:
        raise SystemExit(f"iwsproxy: backends {args.action} needs a URL")
    body = {"url": args.url}
    if args.pool is not None:
        body["pool"] = args.pool
    if args.drain:
        if args.action != "remove":
            raise SystemExit("iwsproxy: --drain goes with backends remove")
        body["drain"] = True
    result = _admin_call(args, "POST" if args.action == "add" else "DELETE", body)
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iwsproxy", description="An interruptible WebSocket proxy.")
    parser.add_argument("--log-level", default=os.environ.get("IWSPROXY_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    _add_setting_flags(serve)
    serve.add_argument("--log-level", default=argparse.SUPPRESS, help="debug, info, warning or error")
    serve.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="two echo backends, the proxy, a stream, a backend kill")
    demo.add_argument("--messages", type=int, default=200)
    demo.set_defaults(func=cmd_demo)

    backends = sub.add_parser("backends", help="list, add or remove backends of a running proxy")
    backends.add_argument("action", choices=["list", "add", "remove"])
    backends.add_argument("url", nargs="?")
    backends.add_argument("--drain", action="store_true",
                          help="with remove: move pipes off the backend first (no loss, no duplicates)")
    backends.add_argument("--pool", default=None,
                          help='the pool: "default" (the catch-all: the --backend URLs or a route for /; the default) '
                               "or a route's prefix; with list: show only that pool")
    backends.add_argument("--admin", default=os.environ.get("IWSPROXY_ADMIN_URL", "http://127.0.0.1:8080/admin"),
                          help="admin API base URL")
    backends.add_argument("--token", default=os.environ.get("IWSPROXY_ADMIN_TOKEN", ""), help="admin bearer token")
    backends.set_defaults(func=cmd_backends)

    sub.add_parser("bench", help="benchmark direct vs. through the proxy (iwsproxy bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options (argparse.REMAINDER drops leading --flags)
        from .tools.bench import main as bench_main
        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command != "serve":  # (serve configures logging itself, once it knows its processes)
            _configure_logging(args.log_level)
        return args.func(args)
    except ConfigError as exc:
        print(f"iwsproxy: invalid setting {exc}", file=sys.stderr)
        return 2
