"""argv -> settings -> run. The only reader of os.environ."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from . import __version__, config, demo, reload, report
from .app import PortInUse, create_app, new_session, start, stop
from .errors import ConfigError
from .keys import RUNTIME
from .policy import hash_key
from .runtime import Runtime
from .tokens import TokenCounter

log = logging.getLogger("meterproxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterproxy", description="OpenAI-compatible metering reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"meterproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="YAML configuration file")
    source.add_argument(
        "--upstream",
        metavar="URL",
        help="quick start: one upstream's /v1 base URL, every model it lists",
    )
    serve.add_argument(
        "--upstream-kind",
        default="vllm",
        choices=config.UPSTREAM_KINDS,
        help="kind of the --upstream server (default: vllm)",
    )
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    _data_dir_argument(serve)
    serve.add_argument("--benchmark-no-metering", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    commands.add_parser("hash-key", help="read a key on stdin, print its sha256: form")

    demo = commands.add_parser("demo", help="the proxy, a simulated vLLM and GPU, and a load")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    _data_dir_argument(demo, "demo")

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")

    usage = commands.add_parser("usage", help="report usage and cost from the ledger")
    where = usage.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", metavar="FILE", help="read the ledger path from this config")
    where.add_argument("--ledger", metavar="PATH", help="the ledger's SQLite file")
    _data_dir_argument(usage)
    usage.add_argument(
        "--by",
        action="append",
        choices=tuple(report.DIMENSIONS),
        help="group by (repeatable); default: tenant",
    )
    usage.add_argument("--since", help="e.g. 7d, 24h, 2026-11-01 (default: everything)")
    usage.add_argument("--until", help="e.g. 1d, 2026-11-08 (default: now)")
    usage.add_argument("--format", default="table", choices=("table", "csv", "json"))
    return parser


def _data_dir_argument(parser: argparse.ArgumentParser, below: str = "") -> None:
    where = "$XDG_STATE_HOME/meterproxy" + (f"/{below}" if below else "")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"where relative ledger and quota paths live (default {where}, "
        "else ~/.local/state/meterproxy" + (f"/{below}" if below else "") + ")",
    )


def data_dir(arg: str | None, environ: Mapping[str, str], below: str = "") -> Path:
    """The state directory: --data-dir, else XDG's state home (~/.local/state) /meterproxy."""
    if arg:
        return Path(arg).expanduser()
    state = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "meterproxy" / below if below else Path(state) / "meterproxy"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = os.environ
    if args.command == "check-config":
        return _check_config(args.file, environ)
    if args.command == "usage":
        return _usage(args, environ)
    if args.command == "demo":
        logging.basicConfig(
            level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        _use_uvloop()
        code = asyncio.run(
            demo.main(args.port, args.host, data_dir(args.data_dir, environ, "demo"))
        )
        if code == 0:
            print("demo stopped")
        return code
    if args.command == "hash-key":
        key = sys.stdin.readline().strip()
        if not key:
            print("error: no key on standard input", file=sys.stderr)
            return 1
        print(f"sha256:{hash_key(key)}")
        return 0
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.config:
            settings = config.load(args.config, environ)
        else:
            settings = config.quick_start(args.upstream, kind=args.upstream_kind)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    state = data_dir(args.data_dir, environ)
    settings = config.in_data_dir(config.with_listen(settings, args.host, args.port), state)
    _use_uvloop()
    try:
        return asyncio.run(
            _serve(settings, environ, args.config, args.benchmark_no_metering, state)
        )
    except PortInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _check_config(path: str, environ: Mapping[str, str]) -> int:
    try:
        config.load(path, environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    print("ok")
    return 0


def _usage(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    path = args.ledger
    if args.config:
        try:
            loaded = config.load(args.config, environ)
            path = config.in_data_dir(loaded, data_dir(args.data_dir, environ)).ledger.path
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"error: {problem}", file=sys.stderr)
            return 1
    if not os.path.exists(path):
        print(f"error: no ledger at {path} (has the proxy run with this config?)", file=sys.stderr)
        return 1
    by = args.by or ["tenant"]
    now = time.time()
    try:
        since = report.parse_time(args.since, now) if args.since else None
        until = report.parse_time(args.until, now) if args.until else None
        rows = report.query(path, by, since, until)
    except report.ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(report.render(rows, by, args.format))
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed; using the standard asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _reload(runtime: Runtime, load: reload.Loader) -> None:
    log.info("SIGHUP: reloading the configuration")
    await reload.reload(runtime, load, new_session)


def tiktoken_cache_dir(environ: Mapping[str, str]) -> str:
    """Where tiktoken looks for rank files (its own lookup order)."""
    return (
        environ.get("TIKTOKEN_CACHE_DIR")
        or environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )


async def _serve(
    settings: config.Settings,
    environ: Mapping[str, str],
    path: str | None,
    no_metering: bool,
    state: Path,
) -> int:
    host, port = settings.server.host, settings.server.port

    def load() -> config.Settings:  # a reload keeps the --host/--port/--data-dir of this run
        return config.in_data_dir(
            config.with_listen(config.load(path or "", environ), host, port), state
        )

    app = create_app(
        settings,
        registry=CollectorRegistry(),
        tokens=TokenCounter(tiktoken_cache_dir(environ)),
        reload_from=(path, load) if path else None,
        metering=not no_metering,
    )
    if no_metering:
        log.warning("--benchmark-no-metering: requests are relayed but NOT metered")
    server = await start(app, settings.server.host, settings.server.port)
    # What exists now lives as long as the process: out of the garbage collector's way, so a
    # full collection (the loop stopped meanwhile) walks only what requests made.
    gc.freeze()
    log.info(
        "meterproxy %s listening on %s (OPENAI_BASE_URL=%s/v1)", __version__, server.url, server.url
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if path:
        runtime = app[RUNTIME]
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: runtime.tasks.spawn("reload:SIGHUP", _reload(runtime, load), group="reload"),
        )
    await stopping.wait()
    log.info(
        "shutting down: draining in-flight requests (up to %ss)", settings.server.drain_timeout_s
    )
    await stop(server)
    log.info("stopped")
    return 0
