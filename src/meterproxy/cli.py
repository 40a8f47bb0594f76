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

from . import __version__, config, demo, host, reload, report, workers
from .app import PortInUse, create_app, new_session, start, stop
from .energy import view as energy_view
from .errors import ConfigError
from .host_link import WorkerContext
from .keys import RUNTIME
from .policy import hash_key
from .runtime import Runtime
from .store.base import is_postgres
from .tokens import TokenCounter
from .value import leaderboard

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
    serve.add_argument(
        "--workers", type=int, help="processes serving the port (default: server.workers, 1)"
    )
    _data_dir_argument(serve)
    serve.add_argument("--benchmark-no-metering", action="store_true", help=argparse.SUPPRESS)
    # Set by the supervisor of `--workers` for the processes it starts.
    serve.add_argument("--role", choices=("worker", "host"), help=argparse.SUPPRESS)
    serve.add_argument("--link", help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
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
    where.add_argument("--config", metavar="FILE", help="read the ledger this config names")
    where.add_argument(
        "--ledger",
        metavar="PATH",
        action="append",
        help="a SQLite ledger file (repeatable: the files are merged) or a postgresql:// URL",
    )
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

    board = commands.add_parser(
        "leaderboard", help="rank tenants, users or models by value (cost per successful task)"
    )
    source = board.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config", metavar="FILE", help="the config: its ledger (path or url), salt, aliases"
    )
    source.add_argument(
        "--ledger", metavar="PATH", help="the ledger's SQLite file or a postgresql:// URL"
    )
    _data_dir_argument(board)
    board.add_argument("--by", default="tenant", choices=leaderboard.BY)
    board.add_argument("--since", default="7d", help="e.g. 7d, 24h, 2026-11-01 (default: 7d)")
    board.add_argument("--until", help="e.g. 1d, 2026-11-08 (default: now)")
    board.add_argument(
        "--rank",
        default="usd",
        choices=leaderboard.RANKS,
        help="usd or joules per successful task (ascending), successes or success_rate",
    )
    board.add_argument("--format", default="table", choices=("table", "csv", "json"))

    energy = commands.add_parser(
        "energy", help="each GPU's fitted energy model, read from a running proxy's /metrics"
    )
    energy.add_argument(
        "--url",
        default="http://127.0.0.1:8080",
        help="the proxy's base URL (default http://127.0.0.1:8080)",
    )
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    environ = os.environ
    if args.command == "check-config":
        return _check_config(args.file, environ)
    if args.command == "usage":
        return _usage(args, environ)
    if args.command == "leaderboard":
        return _leaderboard(args, environ)
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
    if args.command == "energy":
        return energy_view.main(args.url)
    if args.command == "hash-key":
        key = sys.stdin.readline().strip()
        if not key:
            print("error: no key on standard input", file=sys.stderr)
            return 1
        print(f"sha256:{hash_key(key)}")
        return 0
    role = {"worker": f"worker-{args.worker_index} ", "host": "host "}.get(args.role, "")
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s %(levelname)s {role}%(name)s: %(message)s"
    )
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers: expected 1 or more, got {args.workers}", file=sys.stderr)
        return 1
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
    if args.workers is not None:
        settings = config.with_workers(settings, args.workers)
    _use_uvloop()
    worker = None
    if args.role is not None:
        metrics_dir = environ["PROMETHEUS_MULTIPROC_DIR"]
        if args.role == "host":
            return asyncio.run(host.run(settings, args.link, metrics_dir, CollectorRegistry()))
        worker = WorkerContext(args.link, metrics_dir, args.worker_index)
    try:
        if worker is None and settings.server.workers > 1:
            return asyncio.run(workers.supervise(settings, argv, environ))
        return asyncio.run(
            _serve(settings, environ, args.config, args.benchmark_no_metering, state, worker)
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
    ledgers: list[str] = args.ledger or []
    if args.config:
        try:
            loaded = config.load(args.config, environ)
            ledger = config.in_data_dir(loaded, data_dir(args.data_dir, environ)).ledger
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"error: {problem}", file=sys.stderr)
            return 1
        ledgers = [ledger.url or ledger.path]
    for path in ledgers:
        if not is_postgres(path) and not os.path.exists(path):
            print(
                f"error: no ledger at {path} (has the proxy run with this config?)",
                file=sys.stderr,
            )
            return 1
    by = args.by or ["tenant"]
    now = time.time()
    try:
        since = report.parse_time(args.since, now) if args.since else None
        until = report.parse_time(args.until, now) if args.until else None
        rows = report.query(ledgers, by, since, until)
    except report.ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(report.render(rows, by, args.format))
    return 0


def _leaderboard(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    path: str = args.ledger
    salt: str | None = None
    aliases: Mapping[str, str] = {}
    if args.config:
        try:
            loaded = config.load(args.config, environ)
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"error: {problem}", file=sys.stderr)
            return 1
        settings = config.in_data_dir(loaded, data_dir(args.data_dir, environ))
        path = settings.ledger.url or settings.ledger.path
        salt, aliases = settings.value.salt, settings.value.user_aliases
    if not is_postgres(path) and not os.path.exists(path):
        print(f"error: no ledger at {path} (has the proxy run with this config?)", file=sys.stderr)
        return 1
    now = time.time()
    try:
        since = report.parse_time(args.since, now)
        until = report.parse_time(args.until, now) if args.until else now + 1
        names = leaderboard.Names(salt or leaderboard.stored_salt(path), aliases)
        tasks = leaderboard.tasks(path, since, until)
        groups = leaderboard.board(tasks, args.by, names, args.rank)
    except report.ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(leaderboard.render(groups, args.by, args.format))
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
    worker: WorkerContext | None = None,
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
        worker=worker,
    )
    if no_metering:
        log.warning("--benchmark-no-metering: requests are relayed but NOT metered")
    server = await start(
        app, settings.server.host, settings.server.port, reuse_port=worker is not None
    )
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
    watcher = asyncio.create_task(workers.watch_parent(stopping)) if worker else None
    await stopping.wait()
    if watcher is not None:
        watcher.cancel()
    log.info(
        "shutting down: draining in-flight requests (up to %ss)", settings.server.drain_timeout_s
    )
    await stop(server)
    log.info("stopped")
    return 0
