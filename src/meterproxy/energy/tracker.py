"""Energy on the event loop: request events in, readings in, joules out.

An `EnergyBackend`: a request (by its key) on an upstream with GPUs is followed by the
attribution engine; when it settles it is parked until each of its GPUs has a sample past its
end (within 1 s locally), then completed with its joules and GPU-seconds. A source that fails
or stalls shows in `meterproxy_energy_source_up` and the log; parked requests then complete
with energy unknown (None), never a guess.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..backends import EnergyDone, Group
from .attribution import Engine, Weights
from .sampler import Sampler
from .simulated import SimulatedGpus
from .sources import EnergyError, Reading, Source

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..usage import Usage

log = logging.getLogger(__name__)

Opener = Callable[[], Source | None]  # opens the source; blocking, so run off the loop


@dataclass(eq=False)
class _Tracked:
    gpus: tuple[str, ...]
    streamed: bool
    done: EnergyDone | None = None
    due_ns: int = 0


class EnergyTracker:
    """Built once with the app; `open` (at startup) opens the source off the loop and starts
    the sampler. Without a source (none configured, no GPU found) every event is ignored."""

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
        self.metrics, self.clock = metrics, clock
        self.upstream_gpus = dict(upstream_gpus)
        self._weights = weights
        self._interval_s = interval_s
        self.source: Source | None = None
        self.engine = Engine(weights, board_w=lambda gpu: None)
        self._sim: SimulatedGpus | None = None
        self._sampler: Sampler | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._deadline_ns = int(max(2.0, 10 * interval_s) * 1e9)
        self._last: dict[str, tuple[int, int, int, int]] = {}  # gpu -> exported so far
        self._interval_ns = int(interval_s * 1e9)
        self.last_reading_ns = clock()
        self.up = False

    @property
    def active(self) -> bool:
        return self.source is not None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        # NVML initialization and a first DCGM scrape may block: not on the loop.
        source = await loop.run_in_executor(None, self._opener)
        if source is None:
            return
        self.source = source
        self.engine = Engine(self._weights, board_w=source.board_w)
        self._sim = source if isinstance(source, SimulatedGpus) else None
        self.up = True
        self.last_reading_ns = self.clock()
        self.metrics.energy_source_up.labels(source.name).set(1)
        self._sampler = Sampler(source, self._interval_s, loop, self.on_readings, self.on_error)
        self._sampler.start()
        gpus = sorted({g for gs in self.upstream_gpus.values() for g in gs})
        log.info(
            "energy: %s source on GPUs %s, sampled every %ss",
            source.name,
            ", ".join(gpus),
            self._interval_s,
        )

    def gpus(self, upstream: str) -> tuple[str, ...]:
        return self.upstream_gpus.get(upstream, ()) if self.source is not None else ()

    # -- request events ---------------------------------------------------------------------

    def start(
        self, key: str, upstream: str, group: Group, prompt_tokens: int, streamed: bool
    ) -> None:
        gpus = self.gpus(upstream)
        if not gpus:
            return
        self._tracked[key] = _Tracked(gpus, streamed)
        self.engine.start(key, gpus, group, self.clock(), prompt_tokens)
        if not streamed:  # no token progress will show: resident from the start
            self.engine.first_token(key, gpus, 0, self.clock())
        if self._sim is not None:
            self._sim.busy(gpus, +1)
            self._sim.work(gpus, prompt_tokens=prompt_tokens)

    def first_token(self, key: str, prompt_tokens: int, t_ns: int) -> None:
        found = self._tracked.get(key)
        if found is not None:
            self.engine.first_token(key, found.gpus, prompt_tokens, t_ns)

    def decoded(self, key: str, tokens: int) -> None:
        found = self._tracked.get(key)
        if found is not None and tokens > 0:
            self.engine.decoded(key, found.gpus, tokens)
            if self._sim is not None:
                self._sim.work(found.gpus, tokens=tokens)

    def usage(self, key: str, usage: Usage) -> None:
        """Non-streamed answers show their work only here: their decode tokens."""
        found = self._tracked.get(key)
        if found is not None and not found.streamed and usage.completion:
            self.decoded(key, usage.completion)

    def end(self, key: str) -> None:
        found = self._tracked.get(key)
        if found is not None:
            self.engine.end(key, found.gpus, self.clock())
            if self._sim is not None:
                self._sim.busy(found.gpus, -1)

    def defer(self, key: str, done: EnergyDone) -> bool:
        """Park a settled request until its energy is final."""
        found = self._tracked.get(key)
        if found is None:
            return False
        found.done, found.due_ns = done, self.clock() + self._deadline_ns
        self._finish_ready()
        return True

    # -- readings ---------------------------------------------------------------------------

    def on_readings(self, readings: list[Reading]) -> None:
        if self.source is None:
            return
        if not self.up:
            log.info("energy source %s is answering again", self.source.name)
        self.up = True
        self.metrics.energy_source_up.labels(self.source.name).set(1)
        m = self.metrics
        self.last_reading_ns = self.clock()
        for r in readings:
            self.engine.reading(r.gpu, r.t_ns, r.energy_mj)
            book = self.engine.books[r.gpu]
            measured, idle, gaps, clamped = self._last.get(r.gpu, (0, 0, 0, 0))
            m.gpu_energy.labels(r.gpu).inc((book.measured_mj - measured) / 1000)
            m.gpu_idle_energy.labels(r.gpu).inc((book.idle_mj - idle) / 1000)
            if book.gaps > gaps:
                m.energy_gaps.labels(r.gpu).inc(book.gaps - gaps)
                log.warning(
                    "GPU %s: energy counter went backwards (driver reload?); "
                    "that interval is dropped",
                    r.gpu,
                )
            if book.clamped > clamped:
                m.energy_clamped.labels(r.gpu).inc(book.clamped - clamped)
            m.gpu_power.labels(r.gpu).set(r.power_w if r.power_w is not None else book.power_w)
            self._last[r.gpu] = (book.measured_mj, book.idle_mj, book.gaps, book.clamped)
        for group, mj in self.engine.drain_live().items():
            labels: tuple[str, str, str] = group  # type: ignore[assignment]
            m.energy.labels(*labels).inc(mj / 1000)
        self._finish_ready()

    def on_error(self, exc: EnergyError) -> None:
        if self.source is None:
            return
        if self.up:
            log.error("energy source %s stopped answering: %s", self.source.name, exc)
        self.up = False
        self.metrics.energy_source_up.labels(self.source.name).set(0)
        self._finish_ready()

    def check_stalled(self) -> None:
        """Called periodically: a source that stopped producing readings is down."""
        if self.up and self.clock() - self.last_reading_ns > 10 * self._interval_ns:
            self.on_error(
                EnergyError(
                    f"no reading for {(self.clock() - self.last_reading_ns) / 1e9:.1f} s (stalled)"
                )
            )
        elif not self.up:
            self._finish_ready()

    async def watchdog(self) -> None:
        while True:
            await asyncio.sleep(max(self._interval_ns / 1e9, 0.1) * 5)
            self.check_stalled()

    def _finish_ready(self) -> None:
        now = self.clock()
        for key, tracked in list(self._tracked.items()):
            if tracked.done is None:
                continue  # still in flight
            result = self.engine.finished(key, tracked.gpus)
            if result is None and now < tracked.due_ns and self.up:
                continue
            del self._tracked[key]
            if result is None:  # stalled or failed: unknown, not zero
                self.engine.abandon(key, tracked.gpus)
                tracked.done(None, None)
            else:
                tracked.done(result[0] / 1000, result[1] / 1e9 / len(tracked.gpus))

    async def close(self) -> None:
        """At shutdown: stop the sampler, complete every parked request with what is known."""
        if self._sampler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._sampler.stop)
        self.up = False
        self._finish_ready()
