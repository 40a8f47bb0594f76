"""Hot reload: on SIGHUP or when the config file changes, validate the new file and swap it in.
A bad file keeps the old configuration running. Quota and usage state live outside the
settings (keyed by tenant name), so they survive reloads.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import aiohttp

from . import discovery
from .config import Settings
from .errors import ConfigError
from .routing import Router
from .runtime import Live, Runtime, UpstreamState

log = logging.getLogger(__name__)

Loader = Callable[[], Settings]
WATCH_INTERVAL_S = 1.0


async def reload(
    runtime: Runtime, load: Loader, new_session: Callable[..., aiohttp.ClientSession]
) -> bool:
    loop = asyncio.get_running_loop()
    try:
        settings = await loop.run_in_executor(None, load)
    except ConfigError as exc:
        runtime.metrics.config_reloads.labels("error").inc()
        log.error(
            "config reload rejected; still serving the previous configuration:\n  %s",
            "\n  ".join(exc.problems),
        )
        return False
    live = runtime.live
    old = live.settings
    gpus = {u.name: u.gpus for u in settings.upstreams}
    old_gpus = {u.name: u.gpus for u in old.upstreams}
    if (
        (settings.server.host, settings.server.port) != (old.server.host, old.server.port)
        or settings.ledger != old.ledger
        or settings.tenancy.state_path != old.tenancy.state_path
        or settings.energy != old.energy
        or gpus != old_gpus
        or settings.ui != old.ui
        or settings.telemetry != old.telemetry
        or settings.export != old.export
    ):
        log.warning(
            "config reload: the listen address, ledger and quota state paths, the energy, ui, "
            "telemetry and export sections and upstream GPU lists take effect only after a "
            "restart"
        )
    # An upstream that is unchanged keeps its state (pool, occupancy); a new or changed one
    # gets a fresh pool; the pools of removed or replaced ones close once in-flight requests
    # had time to finish.
    states: dict[str, UpstreamState] = {}
    for upstream in settings.upstreams:
        kept = live.upstreams.get(upstream.name)
        if kept is not None and kept.upstream == upstream:
            states[upstream.name] = kept
        else:
            states[upstream.name] = UpstreamState(upstream, new_session(upstream))
    kept_sessions = {id(s.session) for s in states.values()}
    retired = [s.session for s in live.upstreams.values() if id(s.session) not in kept_sessions]
    discovered = {name: models for name, models in live.router.discovered.items() if name in states}
    # One reference swap; in-flight requests keep the view they already hold.
    runtime.swap(Live(settings, Router(settings, discovered), states))
    runtime.quota.reconfigure(settings.tenancy)
    if retired:
        runtime.tasks.spawn(
            "close-retired-sessions", _close_later(retired, settings.server.drain_timeout_s)
        )
    for upstream in settings.upstreams:  # lists may have changed: refresh, and poll new ones
        await discovery.refresh(runtime, upstream)
    for name, state in states.items():
        if live.upstreams.get(name) is not state:
            runtime.tasks.spawn(f"poll-models:{name}", discovery.poll(runtime, state.upstream))
    runtime.metrics.config_reloads.labels("ok").inc()
    log.info(
        "config reloaded from %s: %d upstreams, %d tenants",
        settings.source,
        len(settings.upstreams),
        len(settings.tenancy.tenants),
    )
    return True


async def _close_later(sessions: list[aiohttp.ClientSession], after_s: float) -> None:
    try:
        await asyncio.sleep(after_s)
    finally:  # at shutdown too: a pool is never left open
        await asyncio.gather(*(s.close() for s in sessions))


async def watch(
    runtime: Runtime, path: str, load: Loader, new_session: Callable[..., aiohttp.ClientSession]
) -> None:
    """Reload when the file's modification time or size changes."""

    def stamp() -> tuple[float, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime, st.st_size

    last = stamp()
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        current = stamp()
        if current is not None and current != last:
            last = current
            await reload(runtime, load, new_session)
