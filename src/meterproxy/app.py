"""Composition root: create_app wires settings, registry, clock, backends and sinks into one
app; start/stop run it with the same server options in production and in tests.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import discovery, pricing, reload, routes
from .backends import EnergyBackend, NoEnergy, QuotaBackend
from .config import Ledger as LedgerSettings
from .config import Settings, Upstream
from .energy.factory import open_source
from .energy.local import LocalEnergy
from .energy.sources import Source
from .exchange import Exchange
from .export.exporter import exporter as cloudevents_exporter
from .host_link import HostLink, RemoteEnergy, RemoteQuota, WorkerContext
from .keys import EXPORT, LEDGER, RECONCILER, RELOAD, RUNTIME, STATUS
from .ledger import LEDGER_SCHEMA, Ledger
from .ledger_spend import ledger_reader
from .metrics import Metrics
from .proxy import UpstreamConnector
from .quota_local import LocalQuota
from .reconcile import Reconciler
from .routing import Router
from .runtime import Current, Live, Runtime, UpstreamState
from .server import GuardedSite
from .settlement import EstimateCompleter, Settler, Sink
from .store.base import open_store
from .store.sqlite import SqliteStore
from .tokens import EXECUTOR_THRESHOLD_CHARS, TokenCounter
from .ui import web as ui_web
from .value import web as value_web
from .value.store import ValueStore, value_store
from .watchdog import StreamWatchdog

log = logging.getLogger(__name__)

Clock = Callable[[], int]
# How long shutdown waits for settlements still completing (energy, off-loop estimates).
_SETTLE_WAIT_S = 5.0


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry,
    clock: Clock = time.monotonic_ns,
    wall_clock: Callable[[], float] = time.time,
    sinks: Sequence[Sink] = (),
    tokens: TokenCounter | None = None,
    reload_from: tuple[str, reload.Loader] | None = None,
    energy: Source | Literal["configured"] | None = "configured",
    metering: bool = True,
    worker: WorkerContext | None = None,
) -> web.Application:
    """`clock`: monotonic ns for durations; `wall_clock`: Unix seconds for ledger rows;
    `sinks`: extra receivers of every settlement (tests count settlements with one);
    `reload_from`: the config file to watch and how to load it (hot reload);
    `energy`: the GPU energy source (default: the one the config names; tests inject fakes);
    `metering`: False only for the benchmark's metering-off run;
    `worker`: this process is one worker of `serve --workers` (energy and local quota are the
    host process's, metrics the host's shared files)."""
    metrics = Metrics(registry, worker.metrics_dir if worker else None)
    link = HostLink(worker.link_path, metrics) if worker else None
    if worker is not None:  # one spill file per worker: a restarted worker takes up its own
        settings = worker.own_spill_files(settings)
    current = Current(Live(settings, Router(settings, {})))
    counter = tokens or TokenCounter(None)
    settler = Settler(
        clock,
        wall_clock,
        price=lambda ex: pricing.price(current.live.settings, ex),
        on_error=metrics.metering_errors.inc,
    )
    quota = quota_backend(settings, metrics, clock, wall_clock, link)
    runtime = Runtime(
        current=current,
        metrics=metrics,
        settler=settler,
        tokens=counter,
        quota=quota,
        energy=RemoteEnergy(link, _upstream_gpus(settings))
        if link
        else energy_backend(settings, energy, metrics, clock),
        clock=clock,
        wall_clock=wall_clock,
        watchdog=StreamWatchdog(clock),
        metering=metering,
    )
    settler.add_completer(
        EstimateCompleter(
            count_prompt=lambda ex: counter.count_prompt(ex.model, ex.endpoint, ex.body or {}),
            count_text=lambda ex, text: counter.count_text(ex.model, text),
            spawn=lambda name, coro: runtime.tasks.spawn(name, coro, group="settlement"),
            threshold_chars=EXECUTOR_THRESHOLD_CHARS,
            ready=lambda ex: counter.ready(ex.model),
        )
    )
    if not isinstance(runtime.energy, NoEnergy):  # built once: no energy, nothing to wait for
        settler.add_completer(_energy_completer(runtime.energy))
    ledger = values = None
    if settings.ledger.enabled:
        ledger, values = _ledger_for(settings.ledger, metrics, wall_clock)
    exporter = None
    if settings.export.cloudevents.url:
        exporter = cloudevents_exporter(
            settings.export.cloudevents,
            on_events=lambda result, n: metrics.export_events.labels(result).inc(n),
            spill_path=settings.export.cloudevents.spill_path,
        )
        metrics.track(
            metrics.export_queued, lambda: exporter.queued + exporter.spilled if exporter else 0
        )
    telemetry = None
    if settings.telemetry.otlp_endpoint:
        from .telemetry import OtlpMetrics  # the optional `otel` extra, imported when asked for

        telemetry = OtlpMetrics(settings.telemetry, lambda: runtime.settings.upstreams)
    reconciler = Reconciler(
        lambda: current.live.settings.upstreams,
        metrics,
        time.monotonic,
        interval_s=settings.reconcile.interval_s,
        window_s=settings.reconcile.window_s,
    )
    settler.add_sinks(
        [
            metrics.observe,
            reconciler.observe,
            quota.settle,
            *([ledger.add] if ledger else []),
            *([exporter.add] if exporter else []),
            *([telemetry.observe] if telemetry else []),
            *sinks,
        ]
    )

    # aiohttp reads the body limit from here; the proxy maps its 413 to OpenAI's shape.
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[RUNTIME] = runtime
    if link is not None:  # first in, last out: settlements still wait for the host's energy
        app.cleanup_ctx.append(_linked(link))
    if exporter is not None:  # before the ledger: cleanup runs in reverse, so it closes last
        app[EXPORT] = exporter
        app.cleanup_ctx.append(_export)
    if worker is None:
        app[RECONCILER] = reconciler
    else:  # its proxy side would be this worker's share of the engine's traffic
        log.info("engine reconciliation is off with --workers (it compares one process's view)")
    app.cleanup_ctx.append(_quota)  # after the ledger's wait at shutdown: late settlements count
    if ledger is not None:
        app[LEDGER] = ledger
        app.cleanup_ctx.append(_ledger)
    app.cleanup_ctx.append(_upstream_sessions)
    app.cleanup_ctx.append(_energy)
    app.cleanup_ctx.append(_background_tasks)
    value_web.install(app, runtime, values)  # tasks, outcomes, duplicates: after the ledger
    app[STATUS] = ui_web.new_history(runtime)
    app.cleanup_ctx.append(ui_web.keep_history)
    if telemetry is not None:
        app.cleanup_ctx.append(telemetry.lifetime)
    if reload_from is not None:
        app[RELOAD] = reload_from
        app.cleanup_ctx.append(_watch_config)
    routes.add_routes(app)
    return app


def _ledger_for(
    settings: LedgerSettings, metrics: Metrics, wall_clock: Callable[[], float]
) -> tuple[Ledger, ValueStore]:
    """The configured store (SQLite file or PostgreSQL) for the ledger and, beside it, tasks
    and outcomes; a local spill file for overflow; the gauges that show rows waiting (all of
    them: the value tables' too)."""

    def on_error(kind: str) -> None:
        metrics.ledger_errors.labels(kind).inc()

    ledger = Ledger(
        open_store(settings.store_url, LEDGER_SCHEMA),
        spill=SqliteStore(settings.spill_file, LEDGER_SCHEMA),
        on_error=on_error,
        on_spilled=metrics.ledger_spilled.inc,
        max_queue=settings.max_queue_rows,
        clock=wall_clock,
    )
    values = value_store(
        settings.store_url,
        settings.spill_file,
        on_error=on_error,
        on_spilled=metrics.ledger_spilled.inc,
        max_queue=settings.max_queue_rows,
        clock=wall_clock,
    )
    writers = (ledger, *values.writers)
    metrics.track(metrics.ledger_queued.labels("memory"), lambda: sum(w.queued for w in writers))
    metrics.track(metrics.ledger_queued.labels("spill"), lambda: sum(w.spilled for w in writers))
    metrics.track(metrics.ledger_backlog_age, lambda: max(w.backlog_age_s() for w in writers))
    return ledger, values


def quota_backend(
    settings: Settings,
    metrics: Metrics,
    clock: Clock,
    wall_clock: Callable[[], float],
    link: HostLink | None = None,
) -> QuotaBackend:
    """Redis (shared by replicas), the host process's (shared by workers), or in-process."""
    if settings.quota.backend == "redis":
        from .quota_redis import RedisQuota  # the optional `redis` extra, imported when asked for

        spend = ledger_reader(settings.ledger.store_url) if settings.ledger.enabled else None
        return RedisQuota(settings.quota, settings.tenancy, metrics, spend, wall_clock)
    if link is not None:
        return RemoteQuota(link, settings.quota, settings.tenancy, metrics)
    return LocalQuota(settings.tenancy, metrics, clock, wall_clock)


def _upstream_gpus(settings: Settings) -> dict[str, tuple[str, ...]]:
    return {u.name: tuple(str(g) for g in u.gpus) for u in settings.upstreams}


def energy_backend(
    settings: Settings,
    injected: Source | Literal["configured"] | None,
    metrics: Metrics,
    clock: Clock,
) -> EnergyBackend:
    if injected is None or (injected == "configured" and settings.energy.source == "none"):
        return NoEnergy()
    upstream_gpus = _upstream_gpus(settings)
    gpus = sorted({g for gs in upstream_gpus.values() for g in gs})
    if not gpus:
        return NoEnergy()
    source = injected

    def opener() -> Source | None:
        if isinstance(source, str):
            return open_source(settings.energy, gpus, clock)
        return source

    return LocalEnergy(
        opener,
        upstream_gpus,
        metrics,
        clock,
        settings.energy.weights,
        settings.energy.interval_s,
    )


def _energy_completer(energy: EnergyBackend) -> Callable[[Exchange, Callable[[], None]], bool]:
    def complete(ex: Exchange, done: Callable[[], None]) -> bool:
        def final(joules: float | None, gpu_seconds: float) -> None:
            ex.energy_j = joules
            if joules is not None:  # measured: the energy's split of GPU time replaces wall time
                ex.gpu_seconds = gpu_seconds
            done()

        return energy.defer(ex.key, final)

    return complete


class _Background(Protocol):
    """A part that opens, runs in the background (supervised) and closes: the ledger's writer,
    the CloudEvents exporter, the quota backend."""

    async def open(self) -> None: ...

    async def run(self) -> None: ...

    async def close(self) -> None: ...


def _supervised(
    name: str, part: Callable[[web.Application], _Background]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The lifetime of a background part: open, run supervised (crashes counted under `name`);
    at shutdown, once late settlements have reached it, stopped and closed."""

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        runtime, background = app[RUNTIME], part(app)
        await background.open()
        crashes = runtime.metrics.background_crashes.labels(name)
        task = runtime.tasks.supervise(name, background.run, crashes.inc)
        yield
        # Handlers have drained and energy has closed; let late settlements reach it.
        if not await runtime.settler.wait_idle(_SETTLE_WAIT_S):
            log.error("shutdown: %d settlements did not complete in time", runtime.settler.pending)
        await runtime.tasks.cancel(task)
        await background.close()

    return lifetime


_ledger = _supervised("ledger-writer", lambda app: app[LEDGER])
_export = _supervised("export", lambda app: app[EXPORT])  # its wait comes after the ledger's
_quota = _supervised("quota", lambda app: app[RUNTIME].quota)


def _linked(link: HostLink) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await link.open()
        refresh = app[RUNTIME].tasks.spawn("tracked-gauges", app[RUNTIME].metrics.keep_tracked())
        yield
        await app[RUNTIME].tasks.cancel(refresh)
        await app[RUNTIME].settler.wait_idle(_SETTLE_WAIT_S)
        await link.close()

    return lifetime


def new_session(upstream: Upstream) -> aiohttp.ClientSession:
    """One pooled session per upstream, with explicit timeouts and no total cap (long
    generations must survive). sock_read is the first-byte limit while waiting for headers;
    the relay switches it to the idle limit once they arrive."""
    t = upstream.timeouts
    return aiohttp.ClientSession(
        connector=UpstreamConnector(limit=0, keepalive_timeout=60.0),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=t.connect_s, sock_read=t.first_byte_s
        ),
        auto_decompress=True,
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def _upstream_sessions(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    live = runtime.live
    states = {u.name: UpstreamState(u, new_session(u)) for u in live.settings.upstreams}
    runtime.swap(Live(live.settings, live.router, states))
    yield
    sessions = {id(s.session): s.session for s in runtime.live.upstreams.values()}
    await asyncio.gather(*(s.close() for s in sessions.values()))


async def _energy(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    energy = runtime.energy
    if not isinstance(energy, LocalEnergy):
        yield
        return
    await energy.open()
    watchdog = runtime.tasks.spawn("energy-watchdog", energy.watchdog(), group="energy")
    yield
    await runtime.tasks.cancel(watchdog)
    await energy.close()


async def _watch_config(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    path, load = app[RELOAD]
    task = runtime.tasks.spawn(
        "watch-config", reload.watch(runtime, path, load, new_session), group="reload"
    )
    yield
    await runtime.tasks.cancel(task)


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    await discovery.refresh_all(runtime)
    runtime.tasks.spawn("stream-watchdog", runtime.watchdog.run())
    engines = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    if RECONCILER in app:
        runtime.tasks.spawn("reconcile", app[RECONCILER].run(engines))
    for upstream in runtime.settings.upstreams:
        runtime.tasks.spawn(f"poll-models:{upstream.name}", discovery.poll(runtime, upstream))
    yield
    await runtime.tasks.stop("background")  # with the pollers a reload started
    await engines.close()


@dataclass
class RunningServer:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


async def start(
    app: web.Application, host: str, port: int, *, reuse_port: bool = False
) -> RunningServer:
    """Listen on host:port (0 = any free port) with the options production uses."""
    runtime = app[RUNTIME]
    server = runtime.settings.server
    runner = web.AppRunner(
        app,
        # Cancel the handler when its client disconnects, so the upstream request is dropped
        # at once. aiohttp's test server does this by default and run_app does not: pin it.
        handler_cancellation=True,
        shutdown_timeout=server.drain_timeout_s,
        keepalive_timeout=server.timeouts.keepalive_s,
        access_log=None,
    )
    await runner.setup()
    closed = runtime.metrics.connections_refused
    site = GuardedSite(
        runner,
        host,
        port,
        max_connections=server.max_connections,
        headers_s=server.timeouts.headers_s,
        on_refused=closed.labels("limit").inc,
        on_head_timeout=closed.labels("head_timeout").inc,
        reuse_port=reuse_port,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port) from None
        raise
    return RunningServer(runner, host, site.port)


class PortInUse(Exception):
    """The listen address is taken: one line for the user, never a traceback."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"port {port} on {host} is already in use; pick another with --port "
            "(or listen.port in the config)"
        )


async def stop(server: RunningServer) -> None:
    """Graceful stop: unready first, then close the listener and drain in-flight requests."""
    runtime = server.runner.app[RUNTIME]
    runtime.lifecycle.draining = True
    delay = runtime.settings.server.unready_delay_s
    if delay:
        await asyncio.sleep(delay)
    await server.runner.cleanup()
