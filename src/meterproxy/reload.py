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
from .occupancy import Occupancy
from .routing import Router
from .runtime import Runtime

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
    old = runtime.settings
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
    ):
        log.warning(
            "config reload: the listen address, ledger and quota state paths, the energy, ui "
            "and telemetry sections and upstream GPU lists take effect only after a restart"
        )
    added = [u for u in settings.upstreams if u.name not in runtime.sessions]
    for upstream in added:
        runtime.sessions[upstream.name] = new_session(upstream)
        runtime.occupancy[upstream.name] = Occupancy()
    discovered = {
        name: models
        for name, models in runtime.router.discovered.items()
        if any(u.name == name for u in settings.upstreams)
    }
    # One reference swap each; in-flight requests keep the objects they already hold.
    runtime.settings = settings
    runtime.router = Router(settings, discovered)
    runtime.quota.set_timezone(settings.tenancy.timezone)
    for upstream in settings.upstreams:  # lists may have changed: refresh, and poll new ones
        await discovery.refresh(runtime, upstream)
    for upstream in added:
        runtime.spawn(f"poll-models:{upstream.name}", discovery.poll(runtime, upstream))
    runtime.metrics.config_reloads.labels("ok").inc()
    log.info(
        "config reloaded from %s: %d upstreams, %d tenants",
        settings.source,
        len(settings.upstreams),
        len(settings.tenancy.tenants),
    )
    return True


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
