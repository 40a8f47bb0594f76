"""`POST /v1/feedback` (and `/feedback`, where TensorZero's clients send it), and the value
meter's wiring: its hooks on the settler, its store and its background tasks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from .. import auth, errors, intake, proxy
from ..keys import RUNTIME, VALUE
from ..runtime import Runtime
from .feedback import parse
from .meter import ValueMeter
from .store import OutcomeStore, SqliteStorage

# A feedback body is a few fields; anything larger is not one.
MAX_FEEDBACK_BYTES = 64 * 1024
# How long shutdown waits for settlements still completing before the store closes.
SETTLE_WAIT_S = 5.0


async def feedback(request: web.Request) -> web.Response:
    runtime, meter = request.app[RUNTIME], request.app[VALUE]
    settings = runtime.settings
    try:
        tenant = auth.authenticate(settings.tenancy, request.headers)
        raw = await intake.read_body(request, MAX_FEEDBACK_BYTES, settings.server.timeouts.body_s)
        body = parse(intake.parse_json(raw), settings.value.success_score, intake.clean_text)
        accepted = await meter.report(tenant.name, body)
    except errors.ProxyError as error:
        return proxy.refusal(runtime, error)
    return web.Response(body=orjson.dumps(accepted.body()), content_type="application/json")


def install(app: web.Application, runtime: Runtime) -> ValueMeter:
    """Composition: the meter, its store beside the ledger, its hooks, its lifetime."""
    settings = runtime.settings
    store = None
    if settings.ledger.enabled:
        store = OutcomeStore(
            SqliteStorage(settings.ledger.path),
            on_error=lambda kind: runtime.metrics.ledger_errors.labels(kind).inc(),
        )
    meter = ValueMeter(
        lambda: runtime.settings.value,
        runtime.metrics,
        runtime.clock,
        runtime.wall_clock,
        store=store,
        spawn=lambda name, coro: runtime.tasks.spawn(name, coro, group="settlement"),
    )
    if runtime.metering:
        runtime.settler.add_opener(meter.opened)
        runtime.settler.add_completer(meter.completer)
        runtime.settler.add_sinks([meter.settled])
    app[VALUE] = meter
    app.cleanup_ctx.append(_lifetime)
    return meter


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    runtime, meter = app[RUNTIME], app[VALUE]
    await meter.open()
    crashes = runtime.metrics.background_crashes
    tasks = [runtime.tasks.supervise("task-sweeper", meter.run, crashes.labels("task-sweeper").inc)]
    if meter.store is not None:
        tasks.append(
            runtime.tasks.supervise(
                "outcome-writer", meter.store.run, crashes.labels("outcome-writer").inc
            )
        )
    yield
    await runtime.settler.wait_idle(SETTLE_WAIT_S)  # late settlements still reach the queue
    await runtime.tasks.cancel(*tasks)
    if meter.store is not None:
        await meter.store.close()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_post("/feedback", feedback)  # TensorZero's own path, for its clients
