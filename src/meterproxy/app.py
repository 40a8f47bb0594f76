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
from typing import Literal

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import discovery, pricing, reload, routes
from .backends import EnergyBackend, NoEnergy
from .config import Settings, Upstream
from .energy.factory import open_source
from .energy.local import LocalEnergy
from .energy.sources import Source
from .exchange import Exchange
from .keys import LEDGER, RECONCILER, RELOAD, RUNTIME, STATUS
from .ledger import Ledger
from .metrics import Metrics
from .proxy import UpstreamConnector
from .quota_local import LocalQuota
from .reconcile import Reconciler
from .routing import Router
from .runtime import Current, Live, Runtime, UpstreamState
from .server import GuardedSite
from .settlement import EstimateCompleter, Settler, Sink
from .tokens import EXECUTOR_THRESHOLD_CHARS, TokenCounter
from .ui import web as ui_web
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
) -> web.Application:
    """`clock`: monotonic ns for durations; `wall_clock`: Unix seconds for ledger rows;
    `sinks`: extra receivers of every settlement (tests count settlements with one);
    `reload_from`: the config file to watch and how to load it (hot reload);
    `energy`: the GPU energy source (default: the one the config names; tests inject fakes);
    `metering`: False only for the benchmark's metering-off run."""
    metrics = Metrics(registry)
    current = Current(Live(settings, Router(settings, {})))
    counter = tokens or TokenCounter(None)
    settler = Settler(
        clock,
        wall_clock,
        price=lambda ex: pricing.price(current.live.settings, ex),
        on_error=metrics.metering_errors.inc,
    )
    quota = LocalQuota(settings.tenancy, metrics, clock, wall_clock)
    runtime = Runtime(
        current=current,
        metrics=metrics,
        settler=settler,
        tokens=counter,
        quota=quota,
        energy=_energy_backend(settings, energy, metrics, clock),
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
    settler.add_completer(_energy_completer(runtime.energy))
    ledger = None
    if settings.ledger.enabled:
        ledger = Ledger(
            settings.ledger.path, on_error=lambda kind: metrics.ledger_errors.labels(kind).inc()
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
            *([telemetry.observe] if telemetry else []),
            *sinks,
        ]
    )

    # aiohttp reads the body limit from here; the proxy maps its 413 to OpenAI's shape.
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[RUNTIME] = runtime
    app[RECONCILER] = reconciler
    if ledger is not None:
        app[LEDGER] = ledger
        app.cleanup_ctx.append(_ledger)
    app.cleanup_ctx.append(_quota)
    app.cleanup_ctx.append(_upstream_sessions)
    app.cleanup_ctx.append(_energy)
    app.cleanup_ctx.append(_background_tasks)
    app[STATUS] = ui_web.new_history(runtime)
    app.cleanup_ctx.append(ui_web.keep_history)
    if telemetry is not None:
        app.cleanup_ctx.append(telemetry.lifetime)
    if reload_from is not None:
        app[RELOAD] = reload_from
        app.cleanup_ctx.append(_watch_config)
    routes.add_routes(app)
    return app


def _energy_backend(
    settings: Settings,
    injected: Source | Literal["configured"] | None,
    metrics: Metrics,
    clock: Clock,
) -> EnergyBackend:
    if injected is None or (injected == "configured" and settings.energy.source == "none"):
        return NoEnergy()
    upstream_gpus = {u.name: tuple(str(g) for g in u.gpus) for u in settings.upstreams}
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


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    ledger, runtime = app[LEDGER], app[RUNTIME]
    await ledger.open()
    crashes = runtime.metrics.background_crashes.labels("ledger-writer")
    writer = runtime.tasks.supervise("ledger-writer", ledger.run, crashes.inc)
    yield
    # Handlers have drained and energy has closed; let late settlements reach the queue.
    if not await runtime.settler.wait_idle(_SETTLE_WAIT_S):
        log.error("shutdown: %d settlements did not complete in time", runtime.settler.pending)
    await runtime.tasks.cancel(writer)
    await ledger.close()


async def _quota(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    await runtime.quota.open()
    crashes = runtime.metrics.background_crashes.labels("quota")
    task = runtime.tasks.supervise("quota", runtime.quota.run, crashes.inc)
    yield
    await runtime.tasks.cancel(task)
    await runtime.quota.close()


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
            raise PortInUse(
                f"port {port} on {host} is already in use; pick another with --port "
                "(or listen.port in the config)"
            ) from None
        raise
    return RunningServer(runner, host, site.port)


class PortInUse(Exception):
    """The listen address is taken: one line for the user, never a traceback."""


async def stop(server: RunningServer) -> None:
    """Graceful stop: unready first, then close the listener and drain in-flight requests."""
    runtime = server.runner.app[RUNTIME]
    runtime.lifecycle.draining = True
    delay = runtime.settings.server.unready_delay_s
    if delay:
        await asyncio.sleep(delay)
    await server.runner.cleanup()
