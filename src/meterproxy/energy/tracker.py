"""Energy on the event loop: request events in, readings in, joules out (the in-process
EnergyBackend).

A request on an upstream with GPUs is followed by the attribution engine; when it settles, its
`done` callback is parked until each of its GPUs has closed the interval after its end (about
200 ms locally), then called with its joules and GPU-seconds. A source that fails or stalls
shows in `meterproxy_energy_source_up` and the log; parked requests then complete with energy
unknown (None), never a guess. Each GPU's fitted energy model is exported as it changes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .attribution import Engine, Weights
from .backend import Done, Group
from .calibration import TERMS, FitState
from .simulated import SimulatedGpus
from .sources import EnergyError, Reading, Source

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

    from ..metrics import Metrics

log = logging.getLogger(__name__)

# Completions handed to their settlements per turn of the event loop (~60 us of settling
# each). A reading can make hundreds of requests final at once; settling them all in one
# callback stopped the loop for milliseconds, ten times a second (the p99 of requests arriving
# then). A request in flight waits a slice at each of its turns: eight a turn added ~1.7 ms to
# the p99 at one request in flight, two 0.1-0.2 ms more than one (10 s runs, six pairs).
COMPLETIONS_PER_TURN = 1
# But at least this fraction of the backlog a turn: under load a turn serves many requests, so
# one completion a turn could fall behind the requests that end; a backlog of n drains in
# O(BACKLOG_TURNS x log n) turns whatever the rate.
BACKLOG_TURNS = 64


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
        self._tracked: dict[str, tuple[str, ...]] = {}  # key -> its GPUs
        self._parked: dict[str, tuple[Done, int]] = {}  # key -> (done, due)
        # (due, key) in the order they were parked, so in order of due: the deadlines to watch.
        self._dues: collections.deque[tuple[int, str]] = collections.deque()
        # Final, not yet handed over: (done, joules, GPU-seconds), oldest first.
        self._completions: collections.deque[tuple[Done, float | None, float]] = collections.deque()
        self._draining = False  # a turn of the loop will hand over more
        self._deadline_ns = int(max(2.0, 10 * interval_s) * 1e9)
        self._last: dict[str, tuple[int, float, int, int]] = {}  # gpu -> exported so far
        self._fits: dict[str, FitState] = {}  # gpu -> the state last exported
        self._series: dict[str, tuple[Counter, Counter, Gauge]] = {}  # gpu -> its children
        self._group_series: dict[Group, Counter] = {}
        self._interval_ns = int(interval_s * 1e9)
        self.last_reading_ns = clock()
        self.up = True
        self._up_gauge = metrics.energy_source_up.labels(source.name)
        self._up_gauge.set(1)

    def gpus(self, upstream: str) -> tuple[str, ...]:
        return self.upstream_gpus.get(upstream, ())

    # -- request events (EnergyBackend) -------------------------------------------------------

    def start(
        self, key: str, upstream: str, group: Group, prompt_tokens: int, streamed: bool
    ) -> None:
        gpus = self.gpus(upstream)
        if not gpus:
            return
        self._tracked[key] = gpus
        self.engine.start(key, gpus, group, self.clock(), prompt_tokens, streamed)
        if self._sim is not None:
            self._sim.busy(gpus, +1)
            self._sim.work(gpus, prompt_tokens=prompt_tokens)

    def first_token(self, key: str, t_ns: int) -> None:
        gpus = self._tracked.get(key)
        if gpus is not None:
            self.engine.first_token(key, gpus, t_ns)

    def decoded(self, key: str, tokens: int) -> None:
        gpus = self._tracked.get(key)
        if gpus is not None and tokens > 0:
            self.engine.decoded(key, gpus, self.clock(), tokens)
            if self._sim is not None:
                self._sim.work(gpus, tokens=tokens)

    def usage(
        self, key: str, prompt: int | None, cached_prompt: int | None, completion: int | None
    ) -> None:
        gpus = self._tracked.get(key)
        if gpus is not None:
            self.engine.usage(key, gpus, prompt, cached_prompt, completion)

    def end(self, key: str) -> None:
        gpus = self._tracked.get(key)
        if gpus is not None:
            self.engine.end(key, gpus, self.clock())
            if self._sim is not None:
                self._sim.busy(gpus, -1)

    def defer(self, key: str, done: Done) -> bool:
        if key not in self._tracked or key in self._parked:
            return False
        now = self.clock()
        self._parked[key] = entry = (done, now + self._deadline_ns)
        # Only this request can be ready now: the others change only when a reading closes an
        # interval (or the source fails), and each of those looks at every parked request.
        # (Looking at all of them here cost O(parked) per request: a sixth of the proxy's CPU
        # at a few thousand requests per second.)
        if not self._finish(key, entry, now):
            self._dues.append((entry[1], key))
        if not self._draining:
            self._hand_over()
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
            measured, idle, gaps, clamped = self._last.get(r.gpu, (0, 0.0, 0, 0))
            series = self._series.get(r.gpu)
            if series is None:
                series = self._series[r.gpu] = (
                    m.gpu_energy.labels(r.gpu),
                    m.gpu_idle_energy.labels(r.gpu),
                    m.gpu_power.labels(r.gpu),
                )
            series[0].inc((book.measured_mj - measured) / 1000)
            series[1].inc(max(book.idle_mj - idle, 0.0) / 1000)
            if book.gaps > gaps:
                m.energy_gaps.labels(r.gpu).inc(book.gaps - gaps)
                log.warning(
                    "GPU %s: energy counter went backwards (driver reload?); "
                    "that interval is dropped",
                    r.gpu,
                )
            if book.clamped > clamped:
                m.energy_clamped.labels(r.gpu).inc(book.clamped - clamped)
            series[2].set(r.power_w if r.power_w is not None else book.power_w)
            self._last[r.gpu] = (book.measured_mj, book.idle_mj, book.gaps, book.clamped)
            state = book.fit.state
            if state is not self._fits.get(r.gpu):
                self._fits[r.gpu] = state
                self._export_fit(r.gpu, state)
        for group, mj in self.engine.drain_live().items():
            counter = self._group_series.get(group)  # type: ignore[call-overload]
            if counter is None:
                labels: Group = group  # type: ignore[assignment]
                counter = self._group_series[labels] = m.energy.labels(*labels)
            counter.inc(mj / 1000)
        self._finish_final()

    def _export_fit(self, gpu: str, state: FitState) -> None:
        m = self.metrics
        m.energy_model_trusted.labels(gpu).set(1 if state.trusted else 0)
        m.energy_model_in_use.labels(gpu).set(1 if state.usable else 0)
        m.energy_model_windows.labels(gpu).set(state.windows)
        if state.error_ratio is not None:
            m.energy_model_error.labels(gpu).set(state.error_ratio)
        if state.model is not None:
            for term, value in zip(TERMS, state.model.values(), strict=True):
                m.energy_model.labels(gpu, term).set(value)

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

    def _finish_final(self) -> None:
        """After a reading: the parked requests it made final, and those past their deadline.
        (Only these can have changed: looking at every parked request instead cost O(parked)
        a reading, ~0.4 ms at 1,000 requests a second, in one callback.)"""
        final = self.engine.take_final()
        parked, dues = self._parked, self._dues
        if not parked:
            dues.clear()
            return
        now = self.clock()
        for key in final:
            entry = parked.get(key)
            if entry is not None:
                self._finish(key, entry, now)
        while dues and dues[0][0] <= now:
            key = dues.popleft()[1]
            entry = parked.get(key)
            if entry is not None:
                self._finish(key, entry, now)
        if not self._draining:
            self._hand_over()

    def _finish_ready(self) -> None:
        """Every parked request that can complete (the source is down, or at shutdown)."""
        if not self._parked:
            return
        now = self.clock()
        for key, entry in list(self._parked.items()):
            self._finish(key, entry, now)
        if not self._draining:
            self._hand_over()

    def _finish(self, key: str, entry: tuple[Done, int], now: int) -> bool:
        """Complete one parked request once its energy is known, or past its deadline, or
        when the source is down; whether it did."""
        done, due = entry
        gpus = self._tracked[key]
        result = self.engine.finished(key, gpus)
        if result is None and now < due and self.up:
            return False
        del self._parked[key]
        del self._tracked[key]
        if result is None:  # stalled or failed: unknown, not zero
            _, gpu_ns = self.engine.abandon(key, gpus)
            self._completions.append((done, None, gpu_ns / 1e9 / len(gpus)))
        else:
            self._completions.append((done, result[0] / 1000, result[1] / 1e9 / len(gpus)))
        return True

    def _hand_over(self) -> None:
        """Completions to their settlements, a slice a turn (`handed_per_turn`), the loop
        serving I/O in between (all at once where no loop runs)."""
        self._draining = False
        completions = self._completions
        try:
            for _ in range(min(len(completions), handed_per_turn(len(completions)))):
                done, joules, gpu_seconds = completions.popleft()
                done(joules, gpu_seconds)
        finally:  # even if a settlement raised: the others still get theirs
            if completions:
                self._schedule_hand_over()

    def _schedule_hand_over(self) -> None:
        completions = self._completions
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            while completions:
                done, joules, gpu_seconds = completions.popleft()
                done(joules, gpu_seconds)
            return
        self._draining = True
        loop.call_soon(self._hand_over)

    def close(self) -> None:
        """At shutdown: complete every parked request with what is known."""
        self.up = False
        self._finish_ready()


def handed_per_turn(backlog: int) -> int:
    """How many completions one turn of the loop hands over, of a backlog this long."""
    return max(COMPLETIONS_PER_TURN, backlog // BACKLOG_TURNS)
