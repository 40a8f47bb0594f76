"""The in-process energy backend as the proxy holds it: built once with the app, opened at
startup (the source opened off the loop, the sampler thread started), closed at shutdown.
Until it is open, or when no source is found, every event is ignored and nothing waits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .attribution import Weights
from .backend import Done, Group
from .sampler import Sampler
from .sources import Source
from .tracker import EnergyTracker

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)

Opener = Callable[[], "Source | None"]  # blocking (NVML init, a first DCGM scrape)


class LocalEnergy:
    def __init__(
        self,
        opener: Opener,
        upstream_gpus: Mapping[str, tuple[str, ...]],
        metrics: Metrics,
        clock: Callable[[], int],
        weights: Weights,
        interval_s: float,
    ) -> None:
        self._opener = opener
        self._upstream_gpus = dict(upstream_gpus)
        self._metrics, self._clock = metrics, clock
        self._weights, self._interval_s = weights, interval_s
        self.tracker: EnergyTracker | None = None
        self._sampler: Sampler | None = None

    @property
    def source(self) -> Source | None:
        return self.tracker.source if self.tracker is not None else None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        source = await loop.run_in_executor(None, self._opener)
        if source is None:
            return
        tracker = EnergyTracker(
            source,
            self._upstream_gpus,
            self._metrics,
            self._clock,
            self._weights,
            self._interval_s,
        )
        self._sampler = Sampler(
            source, self._interval_s, loop, tracker.on_readings, tracker.on_error
        )
        self._sampler.start()
        self.tracker = tracker
        gpus = sorted({g for gs in self._upstream_gpus.values() for g in gs})
        log.info(
            "energy: %s source on GPUs %s, sampled every %ss",
            source.name,
            ", ".join(gpus),
            self._interval_s,
        )

    async def watchdog(self) -> None:
        if self.tracker is not None:
            await self.tracker.watchdog()

    async def close(self) -> None:
        if self._sampler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._sampler.stop)
        if self.tracker is not None:
            self.tracker.close()

    # -- EnergyBackend: delegated while a source is open -------------------------------------

    def start(
        self, key: str, upstream: str, group: Group, prompt_tokens: int, streamed: bool
    ) -> None:
        if self.tracker is not None:
            self.tracker.start(key, upstream, group, prompt_tokens, streamed)

    def first_token(self, key: str, t_ns: int) -> None:
        if self.tracker is not None:
            self.tracker.first_token(key, t_ns)

    def decoded(self, key: str, tokens: int) -> None:
        if self.tracker is not None:
            self.tracker.decoded(key, tokens)

    def usage(
        self, key: str, prompt: int | None, cached_prompt: int | None, completion: int | None
    ) -> None:
        if self.tracker is not None:
            self.tracker.usage(key, prompt, cached_prompt, completion)

    def end(self, key: str) -> None:
        if self.tracker is not None:
            self.tracker.end(key)

    def defer(self, key: str, done: Done) -> bool:
        return self.tracker is not None and self.tracker.defer(key, done)
