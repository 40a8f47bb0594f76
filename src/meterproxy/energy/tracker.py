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

from ..metrics import cell
from .attribution import Engine, Weights
from .backend import Done, Group
from .calibration import TERMS, FitState
from .simulated import SimulatedGpus
from .sources import EnergyError, Reading, Source

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from ..metrics import Cell, Metrics

log = logging.getLogger(__name__)

# Background work (closing the intervals readings end, handing completions to their
# settlements) runs in pulses: one at the next turn of the loop after each metered request
# ends (by then the handler has returned and a short answer is written), so the work keeps
# pace with the requests that make it, and one every PULSE_S while work is left and no request
# ends. A pulse takes one closing step (`Engine.step`, ~0.1 ms) for each interval still
# closing, then one hand-over slice (~60 us of settling a completion). Done a slice at every
# turn of the loop instead, a request in flight met one at each of its 4-5 turns: at one
# request in flight the requests that ran while a reading's hundred completions were handed
# over were the p99, ~0.3 ms late.
PULSE_S = 0.005
# Completions handed over per pulse...
COMPLETIONS_PER_PULSE = 1
# ...but at least this fraction of the backlog: under load, completions could otherwise fall
# behind the requests that end; a backlog of n drains in O(BACKLOG_PULSES x log n) pulses.
BACKLOG_PULSES = 64


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
        # Parked requests to look at as the hand-over comes to them (made final, or due).
        self._check: collections.deque[str] = collections.deque()
        self._readings: list[Reading] = []  # submitted, their intervals not yet all closed
        self._soon = False  # a pulse is due at the next turn of the loop
        self._timer: asyncio.TimerHandle | None = None  # the idle pulse, while work is left
        self._deadline_ns = int(max(2.0, 10 * interval_s) * 1e9)
        self._last: dict[str, tuple[int, float, int, int]] = {}  # gpu -> exported so far
        self._fits: dict[str, FitState] = {}  # gpu -> the state last exported
        # Exported at every reading and window, so resolved once: gpu -> energy and idle
        # energy (counters' value cells, `metrics.cell`), power (a gauge); the fit's trusted,
        # in use, windows gauges; its terms' gauges. A group's energy counter's cell.
        self._series: dict[str, tuple[Cell, Cell, Gauge]] = {}
        self._fit_series: dict[str, tuple[Gauge, Gauge, Gauge]] = {}
        self._model_series: dict[str, list[Gauge]] = {}
        self._group_series: dict[Group, Cell] = {}
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
        # interval (which looks at the requests it made final or past due) or the source fails.
        # (Looking at all of them here cost O(parked) per request: a sixth of the proxy's CPU
        # at a few thousand requests per second.)
        if not self._finish(key, entry, now):
            self._dues.append((entry[1], key))
        if self._completions or self._check or self.engine.closing:
            self._wake()
        return True

    # -- readings ---------------------------------------------------------------------------

    def on_readings(self, readings: list[Reading]) -> None:
        """Readings close their intervals a step at a time (`Engine.step`), in pulses: a busy
        interval closed in one callback held the loop ~1 ms at 1,000 requests a second, ten
        times a second, and every request arriving then waited it out."""
        if not self.up:
            log.info("energy source %s is answering again", self.source.name)
            self.up = True
            self._up_gauge.set(1)
        self.last_reading_ns = self.clock()
        self._close_now()  # the last readings' intervals, if still closing: first
        for r in readings:
            self.engine.submit(r.gpu, r.t_ns, r.energy_mj)
        self._readings.extend(readings)
        if not readings:  # no interval to close: still, parked requests may be past due
            self._finish_final()
        self._pulse()

    # -- pulses -----------------------------------------------------------------------------

    def _wake(self) -> None:
        """Work is waiting: a pulse at the next turn of the loop (all of it now without one)."""
        if self._soon:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a benchmark or test driving the tracker): at once
            self._drain()
            return
        self._soon = True
        loop.call_soon(self._pulse, "soon")

    def _pulse(self, by: str = "") -> None:
        """A closing step for each interval still closing, then a hand-over slice (never
        starved by closings: under load with many GPUs they may take all the pulses between
        two readings); then the idle pulse while work is left. `by`: "soon" (`_wake`),
        "timer" (the idle pulse), "" (a reading)."""
        if by == "soon":
            self._soon = False
        elif by == "timer":
            self._timer = None
        engine = self.engine
        try:
            if engine.closing:
                for _ in range(engine.closing):
                    if not engine.step():
                        self._closed()
                        break
            self._hand_over()
        finally:  # even if a settlement raised: the rest is still handed over
            if self._timer is None and (engine.closing or self._completions or self._check):
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    self._drain()
                else:
                    self._timer = loop.call_later(PULSE_S, self._pulse, "timer")

    def _close_now(self) -> None:
        """Every interval still closing, closed now (and what it made final looked at)."""
        if self.engine.closing:
            self.engine.finish_closing()
            self._closed()

    def _drain(self) -> None:
        """All the work, now."""
        self._close_now()
        self._hand_over(limit=False)

    def _closed(self) -> None:
        """Every submitted interval is closed: export what the readings measured, then look
        at the requests they made final."""
        m = self.metrics
        for r in self._readings:
            book = self.engine.books[r.gpu]
            measured, idle, gaps, clamped = self._last.get(r.gpu, (0, 0.0, 0, 0))
            series = self._series.get(r.gpu)
            if series is None:
                series = self._series[r.gpu] = (
                    cell(m.gpu_energy.labels(r.gpu)),
                    cell(m.gpu_idle_energy.labels(r.gpu)),
                    m.gpu_power.labels(r.gpu),  # a gauge: its own `set` (see `metrics.cell`)
                )
            # (cells: the amounts are never negative, measured and idle only grow)
            series[0].inc((book.measured_mj - measured) / 1000)
            if book.idle_mj > idle:  # none while the GPU is busy
                series[1].inc((book.idle_mj - idle) / 1000)
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
            state, before = book.fit.state, self._fits.get(r.gpu)
            if state is not before:
                self._fits[r.gpu] = state
                self._export_fit(r.gpu, state, before)
        self._readings.clear()
        for group, mj in self.engine.drain_live().items():
            counter = self._group_series.get(group)  # type: ignore[call-overload]
            if counter is None:
                labels: Group = group  # type: ignore[assignment]
                counter = self._group_series[labels] = cell(m.energy.labels(*labels))
            if mj > 0.0:  # (a cell: never a negative amount)
                counter.inc(mj / 1000)
        self._finish_final()

    def _export_fit(self, gpu: str, state: FitState, before: FitState | None) -> None:
        """The fit's gauges that changed since `before` (a window closes every second on
        every GPU, busy or not, and most of what it exports stays as it was)."""
        m = self.metrics
        series = self._fit_series.get(gpu)
        if series is None:  # gauges, set through their own `set` (see `metrics.cell`)
            series = self._fit_series[gpu] = (
                m.energy_model_trusted.labels(gpu),
                m.energy_model_in_use.labels(gpu),
                m.energy_model_windows.labels(gpu),
            )
        if before is None or state.trusted != before.trusted:
            series[0].set(1 if state.trusted else 0)
        if before is None or state.usable != before.usable:
            series[1].set(1 if state.usable else 0)
        if before is None or state.windows != before.windows:
            series[2].set(state.windows)
        if state.error_ratio is not None and (
            before is None or state.error_ratio != before.error_ratio
        ):
            # Labelled only once there is a ratio: an unset gauge would read 0, an exact fit.
            m.energy_model_error.labels(gpu).set(state.error_ratio)
        if state.model is not None:
            terms = self._model_series.get(gpu)
            if terms is None:
                terms = self._model_series[gpu] = [m.energy_model.labels(gpu, t) for t in TERMS]
            old = before.model.values() if before is not None and before.model is not None else None
            for k, value in enumerate(state.model.values()):
                if old is None or old[k] != value:
                    terms[k].set(value)

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
        """After a reading: the parked requests it made final, and those past their deadline,
        are looked at by the hand-over, a slice a pulse. (Only these can have changed: looking
        at every parked request instead cost O(parked) a reading, ~0.4 ms at 1,000 requests a
        second, in one callback.)"""
        final = self.engine.take_final()
        parked, dues = self._parked, self._dues
        if not parked:
            dues.clear()
            return
        check = self._check
        check.extend(final)
        now = self.clock()
        while dues and dues[0][0] <= now:
            check.append(dues.popleft()[1])

    def _finish_ready(self) -> None:
        """Every parked request that can complete (the source is down, or at shutdown)."""
        self._close_now()
        now = self.clock()
        for key, entry in list(self._parked.items()):
            self._finish(key, entry, now)
        if self._completions:
            self._wake()

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
            self._close_now()  # an interval still closing may hold its share: first
            _, gpu_ns = self.engine.abandon(key, gpus)
            self._completions.append((done, None, gpu_ns / 1e9 / len(gpus)))
        else:
            self._completions.append((done, result[0] / 1000, result[1] / 1e9 / len(gpus)))
        return True

    def _hand_over(self, limit: bool = True) -> None:
        """Completions to their settlements, a slice (`handed_per_pulse`; all of them without
        `limit`). The requests to look at (`_check`) are completed on the way, as their turn
        comes."""
        completions, check, parked = self._completions, self._check, self._parked
        todo = handed_per_pulse(len(completions) + len(check)) if limit else -1
        now = self.clock()
        while todo and (completions or check):
            if not completions:
                key = check.popleft()
                entry = parked.get(key)
                if entry is None or not self._finish(key, entry, now):
                    continue  # completed already, or another of its GPUs is still open
            done, joules, gpu_seconds = completions.popleft()
            todo -= 1
            done(joules, gpu_seconds)

    def close(self) -> None:
        """At shutdown: complete every parked request with what is known, now."""
        self.up = False
        try:
            self._finish_ready()
            self._drain()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


def handed_per_pulse(backlog: int) -> int:
    """How many completions one pulse hands over, of a backlog this long."""
    return max(COMPLETIONS_PER_PULSE, backlog // BACKLOG_PULSES)
