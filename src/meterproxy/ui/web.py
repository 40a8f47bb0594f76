"""The status page over HTTP: `/` (where things are), `/ui` (the page, static), `/ui/data` (its
JSON, admin-only once tenants exist), and the background task that keeps the history ring."""

from __future__ import annotations

import asyncio
import importlib.resources
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from .. import auth, errors, proxy
from ..keys import RUNTIME, STATUS
from ..runtime import Runtime
from . import view
from .history import History, Snapshot, take

PAGE = importlib.resources.files(__package__).joinpath("page.html").read_bytes()
# The page is one file: its script and style are inline, it fetches only its own data.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
INDEX = b"""<!doctype html><meta charset="utf-8"><title>meterproxy</title>
<style>body{font:16px/1.6 system-ui,sans-serif;margin:3rem auto;max-width:40rem;color:#1f2933}
code{background:#eef2f6;padding:0 .3em;border-radius:3px}</style>
<h1>meterproxy</h1>
<p>An OpenAI-compatible metering proxy. Point <code>OPENAI_BASE_URL</code> at
<code>/v1</code> of this address.</p>
<ul>
<li><a href="ui">Status page</a>: tokens, energy, cost and quotas, live</li>
<li><a href="metrics">/metrics</a>: Prometheus text format</li>
<li><a href="healthz">/healthz</a> and <a href="readyz">/readyz</a></li>
</ul>
"""


def snapshot(runtime: Runtime) -> Snapshot:
    """The registry's samples now: the same numbers /metrics would print at this instant."""
    samples = (
        (s.name, s.labels, s.value)
        for family in runtime.metrics.registry.collect()
        for s in family.samples
    )
    return take(samples, runtime.wall_clock())


def current(app: web.Application) -> view.View:
    """What `/ui/data` serves now (also for the terminal summary: ui.terminal.summary)."""
    runtime = app[RUNTIME]
    settings = runtime.settings
    gpus = {u.name: [str(g) for g in u.gpus] for u in settings.upstreams}
    return view.build(app[STATUS], snapshot(runtime), settings.tenancy.tenants, gpus)


async def index(request: web.Request) -> web.Response:
    return web.Response(body=INDEX, content_type="text/html", headers=PAGE_HEADERS)


async def page(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, content_type="text/html", headers=PAGE_HEADERS)


async def data(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        auth.authenticate_admin(runtime.settings.tenancy, request.headers)
    except errors.ProxyError as refused:
        return proxy.refusal(runtime, refused)
    body = orjson.dumps(current(request.app))
    return web.Response(
        body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


async def keep_history(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: a first snapshot before any request, then one every `ui.interval_s`."""
    runtime, ring = app[RUNTIME], app[STATUS]
    ring.add(snapshot(runtime))

    async def every_interval() -> None:
        while True:
            await asyncio.sleep(ring.interval_s)
            ring.add(snapshot(runtime))

    task = runtime.tasks.spawn("status-history", every_interval(), group="status")
    yield
    await runtime.tasks.cancel(task)


def new_history(runtime: Runtime) -> History:
    ui = runtime.settings.ui
    return History(ui.history_s, ui.interval_s)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/data", data)
