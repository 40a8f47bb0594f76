"""The typed state one running proxy shares between its handlers and background tasks."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .config import Settings
from .energy.tracker import EnergyTracker
from .meter import Clock, Meter
from .metrics import Metrics
from .occupancy import Occupancy
from .quota import Quota
from .routing import Router
from .tokens import TokenCounter

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Runtime:
    settings: Settings
    router: Router
    meter: Meter
    metrics: Metrics
    tokens: TokenCounter
    clock: Clock
    wall_clock: Callable[[], float]
    quota: Quota
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    # upstream name -> clock() of its last HTTP answer (any status), for /readyz
    last_answer_ns: dict[str, int] = field(default_factory=dict)
    # upstream name -> wall-time split among its in-flight requests (GPU-seconds for cost)
    occupancy: dict[str, Occupancy] = field(default_factory=dict)
    draining: bool = False
    # Benchmark-only (`serve --benchmark-no-metering`): relay without watching or settling, to
    # measure what metering costs. Never set in production.
    metering: bool = True
    energy: EnergyTracker | None = None  # set when an energy source is open
    last_on_demand_ns: int = -(2**62)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _id_prefix: str = field(default_factory=lambda: os.urandom(6).hex())
    _id_next: int = 0

    def new_request_id(self) -> str:
        self._id_next += 1
        return f"mp-{self._id_prefix}-{self._id_next}"

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start a background task that is kept, named, and logged if it crashes."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s crashed", task.get_name(), exc_info=task.exception())

    async def stop_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
