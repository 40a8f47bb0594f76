"""Polls each upstream's /v1/models: the model lists of `models: ["*"]` upstreams, and the
"answered recently" signal behind /readyz. The router is rebuilt and swapped on change.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson

from .config import Upstream
from .routing import Router, parse_model_list
from .runtime import Live, Runtime

log = logging.getLogger(__name__)

# An on-demand refresh (an unknown model asked for) runs at most this often per upstream.
ON_DEMAND_MIN_INTERVAL_NS = 5_000_000_000


async def fetch_models(runtime: Runtime, upstream: Upstream) -> tuple[dict[str, Any], ...] | None:
    state = runtime.live.upstreams.get(upstream.name)
    if state is None:
        return None  # removed by a reload
    session = state.session
    headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
    timeout = aiohttp.ClientTimeout(total=upstream.timeouts.connect_s + 5.0)
    try:
        async with session.get(
            upstream.url + "/models", headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            state.last_answer_ns = runtime.clock()
            if response.status != 200:
                log.warning(
                    "upstream %s: GET /models answered HTTP %d", upstream.name, response.status
                )
                return None
            payload = await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        log.warning("upstream %s: GET /models failed (%s)", upstream.name, type(exc).__name__)
        return None
    try:
        models = parse_model_list(orjson.loads(payload))
    except orjson.JSONDecodeError:
        models = None
    if models is None:
        log.warning("upstream %s: GET /models did not return an OpenAI model list", upstream.name)
    return models


async def refresh(runtime: Runtime, upstream: Upstream) -> None:
    models = await fetch_models(runtime, upstream)
    if models is None or not upstream.discovers_models:
        return
    live = runtime.live  # read after the await: a reload may have swapped it meanwhile
    if live.router.discovered.get(upstream.name) == models:
        return
    discovered = dict(live.router.discovered)
    discovered[upstream.name] = models
    runtime.swap(Live(live.settings, Router(live.settings, discovered), live.upstreams))
    log.info(
        "upstream %s serves %d models: %s",
        upstream.name,
        len(models),
        ", ".join(m["id"] for m in models[:20]),
    )


async def refresh_all(runtime: Runtime) -> None:
    await asyncio.gather(*(refresh(runtime, u) for u in runtime.settings.upstreams))


async def refresh_on_demand(runtime: Runtime) -> bool:
    """Refresh model lists now (an unknown model was asked for); False if not worth it."""
    if not any(u.discovers_models for u in runtime.settings.upstreams):
        return False
    now = runtime.clock()
    if now - runtime.lifecycle.last_on_demand_ns < ON_DEMAND_MIN_INTERVAL_NS:
        return False
    runtime.lifecycle.last_on_demand_ns = now
    await asyncio.gather(
        *(refresh(runtime, u) for u in runtime.settings.upstreams if u.discovers_models)
    )
    return True


async def poll(runtime: Runtime, upstream: Upstream) -> None:
    """Until a reload removes or replaces this upstream."""
    while True:
        await asyncio.sleep(upstream.refresh_interval_s)
        state = runtime.live.upstreams.get(upstream.name)
        if state is None or state.upstream is not upstream:
            return
        await refresh(runtime, upstream)


def is_ready(runtime: Runtime) -> bool:
    if runtime.lifecycle.draining:
        return False
    now = runtime.clock()
    for state in runtime.live.upstreams.values():
        seen = state.last_answer_ns
        if seen is not None and now - seen <= 3 * state.upstream.refresh_interval_s * 1e9:
            return True
    return False
