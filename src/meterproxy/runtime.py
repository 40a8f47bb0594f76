"""The typed state one running proxy shares between its handlers and background tasks.

`Runtime` is built once by `create_app` and never reassigned. What a reload or a model-list
refresh changes is one frozen `Live` (settings, router, per-upstream state), swapped whole
through `Current`: a request reads `runtime.live` once and keeps that view to its end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .backends import EnergyBackend, QuotaBackend
from .config import Settings, Upstream
from .exchange import RequestKeys
from .metrics import Metrics
from .occupancy import Occupancy
from .routing import Router
from .settlement import Settler
from .tokens import TokenCounter
from .watchdog import StreamWatchdog

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # monotonic nanoseconds


@dataclass(eq=False)
class UpstreamState:
    """What outlives a request for one upstream: its connection pool, the split of its wall
    time among requests (GPU-seconds), and when it last answered (for /readyz)."""

    upstream: Upstream
    session: aiohttp.ClientSession
    occupancy: Occupancy = field(default_factory=Occupancy)
    last_answer_ns: int | None = None


@dataclass(frozen=True, eq=False)
class Live:
    settings: Settings
    router: Router
    upstreams: Mapping[str, UpstreamState] = field(default_factory=dict)


class Current:
    """The one reference that a reload or a discovery swaps."""

    __slots__ = ("live",)

    def __init__(self, live: Live) -> None:
        self.live = live


class Lifecycle:
    __slots__ = ("draining", "last_on_demand_ns")

    def __init__(self) -> None:
        self.draining = False
        self.last_on_demand_ns = -(2**62)


class Tasks:
    """Background tasks: kept, named, logged if they crash, stopped by their owner (a group:
    `background` for pollers and watchers, which stop first at shutdown)."""

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[None], str] = {}

    def spawn(
        self, name: str, coro: Coroutine[Any, Any, None], *, group: str = "background"
    ) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = group
        task.add_done_callback(self._done)
        return task

    def supervise(
        self,
        name: str,
        run: Callable[[], Coroutine[Any, Any, None]],
        on_crash: Callable[[], None],
        backoff_s: float = 1.0,
    ) -> asyncio.Task[None]:
        """Run `run()` until cancelled, restarting it (after `backoff_s`) whenever it crashes:
        a writer that dies must not take the meter with it."""

        async def forever() -> None:
            while True:
                try:
                    await run()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    on_crash()
                    log.exception("background task %s crashed; restarting it", name)
                    await asyncio.sleep(backoff_s)

        return self.spawn(name, forever(), group=name)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s crashed", task.get_name(), exc_info=task.exception())

    @staticmethod
    async def cancel(*tasks: asyncio.Task[None]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self, group: str) -> None:
        await self.cancel(*(t for t, g in self._tasks.items() if g == group))


@dataclass(frozen=True, eq=False)
class Runtime:
    current: Current
    metrics: Metrics
    settler: Settler
    tokens: TokenCounter
    quota: QuotaBackend
    energy: EnergyBackend
    clock: Clock
    wall_clock: Callable[[], float]
    watchdog: StreamWatchdog
    keys: RequestKeys = field(default_factory=RequestKeys)
    tasks: Tasks = field(default_factory=Tasks)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    # Benchmark-only (`serve --benchmark-no-metering`): relay without watching or settling, to
    # measure what metering costs. Never off in production.
    metering: bool = True

    @property
    def live(self) -> Live:
        return self.current.live

    @property
    def settings(self) -> Settings:
        return self.current.live.settings

    @property
    def router(self) -> Router:
        return self.current.live.router

    def swap(self, live: Live) -> None:
        self.current.live = live
