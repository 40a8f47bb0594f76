"""Composition root: create_app wires settings, registry, clock and sinks into one app;
start/stop run it with the same server options in production and in tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import discovery, pricing, reload, routes
from .config import Settings, Upstream
from .energy.factory import open_source
from .energy.sampler import Sampler
from .energy.sources import Source
from .energy.tracker import EnergyTracker
from .keys import ENERGY_SOURCE, LEDGER, RELOAD, RUNTIME
from .ledger import Ledger
from .meter import Clock, Meter, Record, Sink
from .metrics import Metrics
from .occupancy import Occupancy
from .quota import Quota
from .quota_store import QuotaStore
from .routing import Router
from .runtime import Runtime
from .tokens import TokenCounter

log = logging.getLogger(__name__)


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
) -> web.Application:
    """`clock`: monotonic ns for durations; `wall_clock`: Unix seconds for ledger rows;
    `sinks`: extra receivers of every settled record (tests count settlements with one);
    `reload_from`: the config file to watch and how to load it (hot reload);
    `energy`: the GPU energy source (default: the one the config names; tests inject fakes)."""
    metrics = Metrics(registry)
    ledger = None
    if settings.ledger.enabled:
        ledger = Ledger(
            settings.ledger.path,
            wall_clock=wall_clock,
            on_error=lambda kind: metrics.ledger_errors.labels(kind).inc(),
        )

    def annotate(record: Record) -> None:
        current = runtime.settings
        gpus = next((len(u.gpus) for u in current.upstreams if u.name == record.upstream), 0)
        pricing.price(current.prices, record, gpus)

    quota = Quota(settings.tenancy.timezone)

    def settle_quota(record: Record) -> None:
        ticket = record.ticket
        if ticket is None:
            return
        usage, now_ns, now_s = record.usage, clock(), wall_clock()
        tokens = (usage.prompt or 0) + (usage.completion or 0)
        quota.settle(ticket, tokens, record.cost_usd, record.energy_j or 0.0, now_ns, now_s)
        tenant = runtime.settings.tenancy.tenant(ticket.tenant)
        for limit, ratio in quota.ratios(tenant, now_ns, now_s).items():
            metrics.quota_usage_ratio.labels(tenant.name, limit).set(ratio)

    all_sinks = [metrics.observe, settle_quota, *([ledger.add] if ledger else []), *sinks]
    meter = Meter(clock, all_sinks, on_error=metrics.metering_errors.inc, annotate=annotate)
    runtime = Runtime(
        settings=settings,
        router=Router(settings, {}),
        meter=meter,
        metrics=metrics,
        tokens=tokens or TokenCounter(None),
        clock=clock,
        wall_clock=wall_clock,
        quota=quota,
        occupancy={u.name: Occupancy() for u in settings.upstreams},
    )
    # aiohttp reads the body limit from here; the proxy maps its 413 to OpenAI's shape.
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[RUNTIME] = runtime
    if ledger is not None:
        app[LEDGER] = ledger
        app.cleanup_ctx.append(_ledger)
    app.cleanup_ctx.append(_quota_store)
    app.cleanup_ctx.append(_upstream_sessions)
    app.cleanup_ctx.append(_background_tasks)
    app[ENERGY_SOURCE] = energy
    app.cleanup_ctx.append(_energy)
    if reload_from is not None:
        app[RELOAD] = reload_from
        app.cleanup_ctx.append(_watch_config)
    routes.add_routes(app)
    return app


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    ledger, runtime = app[LEDGER], app[RUNTIME]
    await ledger.open()
    runtime.spawn("ledger-writer", ledger.run())
    yield
    # Handlers have drained by now; cancel the writer, then write whatever is still queued.
    await runtime.stop_tasks()
    await ledger.close()


def new_session(upstream: Upstream) -> aiohttp.ClientSession:
    """One pooled session per upstream, with explicit timeouts and no total cap (long
    generations must survive). sock_read is the first-byte limit while waiting for headers;
    the relay switches it to the idle limit once they arrive."""
    t = upstream.timeouts
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=t.connect_s, sock_read=t.first_byte_s
        ),
        auto_decompress=True,
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def _upstream_sessions(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    for upstream in runtime.settings.upstreams:
        runtime.sessions[upstream.name] = new_session(upstream)
    yield
    await asyncio.gather(*(s.close() for s in runtime.sessions.values()))


async def _quota_store(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    store = QuotaStore(runtime.settings.tenancy.state_path, runtime.quota)
    await store.open(runtime.wall_clock())
    runtime.spawn("quota-store", store.run())
    yield
    await runtime.stop_tasks()
    await store.close()


async def _energy(app: web.Application) -> AsyncIterator[None]:
    runtime, settings = app[RUNTIME], app[RUNTIME].settings
    upstream_gpus = {u.name: tuple(str(g) for g in u.gpus) for u in settings.upstreams}
    gpus = sorted({g for gs in upstream_gpus.values() for g in gs})
    injected = app[ENERGY_SOURCE]
    loop = asyncio.get_running_loop()
    source: Source | None
    if isinstance(injected, str):
        # NVML initialization and a first DCGM scrape may block: not on the loop.
        source = await loop.run_in_executor(
            None, lambda: open_source(settings.energy, gpus, runtime.clock)
        )
    else:
        source = injected
    if source is None:
        yield
        return
    tracker = EnergyTracker(
        source,
        upstream_gpus,
        runtime.metrics,
        runtime.clock,
        settings.energy.weights,
        settings.energy.interval_s,
    )
    runtime.energy = tracker

    def defer(record: Record, complete: Callable[[Record], None]) -> bool:
        """Settlement waits for the request's energy (EnergyBackend.defer, by request key)."""

        def done(energy_j: float | None, gpu_seconds: float) -> None:
            record.energy_j = energy_j
            if energy_j is not None:
                record.gpu_seconds = gpu_seconds
            complete(record)

        return tracker.defer(record.request_id, done)

    runtime.meter.defer = defer
    sampler = Sampler(
        source, settings.energy.interval_s, loop, tracker.on_readings, tracker.on_error
    )
    sampler.start()
    runtime.spawn("energy-watchdog", tracker.watchdog())
    log.info(
        "energy: %s source on GPUs %s, sampled every %ss",
        source.name,
        ", ".join(gpus),
        settings.energy.interval_s,
    )
    yield
    await loop.run_in_executor(None, sampler.stop)
    tracker.close()


async def _watch_config(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    path, load = app[RELOAD]
    runtime.spawn("watch-config", reload.watch(runtime, path, load, new_session))
    yield


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    await discovery.refresh_all(runtime)
    for upstream in runtime.settings.upstreams:
        runtime.spawn(f"poll-models:{upstream.name}", discovery.poll(runtime, upstream))
    yield
    await runtime.stop_tasks()


@dataclass
class RunningServer:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


async def start(app: web.Application, host: str, port: int) -> RunningServer:
    """Listen on host:port (0 = any free port) with the options production uses."""
    settings = app[RUNTIME].settings
    runner = web.AppRunner(
        app,
        # Cancel the handler when its client disconnects, so the upstream request is dropped
        # at once. aiohttp's test server does this by default and run_app does not: pin it.
        handler_cancellation=True,
        shutdown_timeout=settings.server.drain_timeout_s,
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return RunningServer(runner, host, bound)


async def stop(server: RunningServer) -> None:
    """Graceful stop: unready first, then close the listener and drain in-flight requests."""
    runtime = server.runner.app[RUNTIME]
    runtime.draining = True
    delay = runtime.settings.server.unready_delay_s
    if delay:
        await asyncio.sleep(delay)
    await server.runner.cleanup()
