"""Energy on the event loop: request events in, readings in, joules out.

A request on an upstream with GPUs is followed by the attribution engine; when it settles its
record is parked until each of its GPUs has a sample past its end (within 1 s locally), then
completed with its joules and GPU-seconds. A source that fails or stalls shows in
`meterproxy_energy_source_up` and the log; parked records then complete with energy unknown
(None), never a guess.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..meter import Record
from .attribution import Engine, Weights
from .simulated import SimulatedGpus
from .sources import EnergyError, Reading, Source

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)

Complete = Callable[[Record], None]


class EnergyTracker:
    def __init__(
        self,
        source: Source,
        upstream_gpus: Mapping[str, tuple[str, ...]],
        metrics: Metrics,
        clock: Callable[[], int],
        weights: Weights,
        interval_s: float,
    ) -> None:
        self.source, self.metrics, self.clock = source, metrics, clock
        self.upstream_gpus = dict(upstream_gpus)
        self.engine = Engine(weights, board_w=source.board_w)
        self._sim = source if isinstance(source, SimulatedGpus) else None
        self._tracked: dict[int, tuple[Record, tuple[str, ...]]] = {}
        self._parked: dict[int, tuple[Record, Complete, int]] = {}  # id -> (record, done, due)
        self._deadline_ns = int(max(2.0, 10 * interval_s) * 1e9)
        self._last: dict[str, tuple[int, int, int, int]] = {}  # gpu -> exported so far
        self._interval_ns = int(interval_s * 1e9)
        self.last_reading_ns = clock()
        self.up = True
        self._up_gauge = metrics.energy_source_up.labels(source.name)
        self._up_gauge.set(1)

    def gpus(self, upstream: str) -> tuple[str, ...]:
        return self.upstream_gpus.get(upstream, ())

    # -- request events ---------------------------------------------------------------------

    def start(self, record: Record, prompt_tokens: int) -> None:
        gpus = self.gpus(record.upstream)
        if not gpus:
            return
        self._tracked[id(record)] = (record, gpus)
        group = (record.model, record.upstream, record.tenant)
        self.engine.start(id(record), gpus, group, self.clock(), prompt_tokens)
        if self._sim is not None:
            self._sim.busy(gpus, +1)
            self._sim.work(gpus, prompt_tokens=prompt_tokens)

    def first_token(self, record: Record, prompt_tokens: int, t_ns: int | None = None) -> None:
        found = self._tracked.get(id(record))
        if found is not None:
            self.engine.first_token(id(record), found[1], prompt_tokens, t_ns or self.clock())

    def decoded(self, record: Record, tokens: int) -> None:
        found = self._tracked.get(id(record))
        if found is not None and tokens > 0:
            self.engine.decoded(id(record), found[1], tokens)
            if self._sim is not None:
                self._sim.work(found[1], tokens=tokens)

    def end(self, record: Record) -> None:
        found = self._tracked.get(id(record))
        if found is not None:
            self.engine.end(id(record), found[1], self.clock())
            if self._sim is not None:
                self._sim.busy(found[1], -1)

    def defer(self, record: Record, complete: Complete) -> bool:
        """Meter hook: park a settled record until its energy is final."""
        if id(record) not in self._tracked:
            return False
        self._parked[id(record)] = (record, complete, self.clock() + self._deadline_ns)
        self._finish_ready()
        return True

    # -- readings ---------------------------------------------------------------------------

    def on_readings(self, readings: list[Reading]) -> None:
        if not self.up:
            log.info("energy source %s is answering again", self.source.name)
        self.up = True
        self._up_gauge.set(1)
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
        if self.up:
            log.error("energy source %s stopped answering: %s", self.source.name, exc)
        self.up = False
        self._up_gauge.set(0)
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
        for key, (record, complete, due) in list(self._parked.items()):
            gpus = self._tracked[key][1]
            result = self.engine.finished(key, gpus)
            if result is None and now < due and self.up:
                continue
            if result is None:  # stalled or failed: unknown, not zero
                self.engine.abandon(key, gpus)
                record.energy_j = None
            else:
                record.energy_j = result[0] / 1000
                record.gpu_seconds = result[1] / 1e9 / len(gpus)
            del self._parked[key]
            del self._tracked[key]
            complete(record)

    def close(self) -> None:
        """At shutdown: complete every parked record with what is known."""
        self.up = False
        self._finish_ready()
