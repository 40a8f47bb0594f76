"""The energy tracker on the loop: a parked request completes once its GPUs have sampled past
its end, with a deadline, whatever else is parked (fake NVML, an injected clock)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from meterproxy.energy import tracker as tracker_module
from meterproxy.energy.attribution import SHARES_PER_STEP, Weights
from meterproxy.energy.nvml import NvmlSource
from meterproxy.energy.tracker import (
    BACKLOG_PULSES,
    COMPLETIONS_PER_PULSE,
    PULSE_S,
    EnergyTracker,
    handed_per_pulse,
)
from meterproxy.metrics import Metrics
from meterproxy.sim.pynvml_fake import FakeNvml

MS = 1_000_000


def tracker(now: list[int]) -> tuple[EnergyTracker, Callable[[], None]]:
    clock = lambda: now[0]  # noqa: E731
    source = NvmlSource(
        FakeNvml({"0": lambda t: t * 300_000.0}, clock=lambda: now[0] / 1e9), ["0"], clock
    )
    energy = EnergyTracker(
        source, {"u": ("0",)}, Metrics(CollectorRegistry()), clock, Weights(), 0.1
    )

    def sample() -> None:
        energy.on_readings(source.read())

    return energy, sample


def test_parked_requests_complete_at_the_second_reading_after_their_end() -> None:
    now = [0]
    energy, sample = tracker(now)
    sample()
    done: dict[str, tuple[float | None, float]] = {}
    for i in range(200):
        energy.start(f"k{i}", "u", ("m", "u", "t"), 10, False)
    now[0] = 50 * MS
    for i in range(200):
        energy.end(f"k{i}")
        assert energy.defer(f"k{i}", lambda j, g, i=i: done.__setitem__(f"k{i}", (j, g)))
    assert not done  # no reading has closed the interval they ended in
    now[0] = 100 * MS
    sample()
    assert not done  # the interval after the end is still open: the counter lags the work
    now[0] = 200 * MS
    sample()
    assert sorted(done) == sorted(f"k{i}" for i in range(200))
    total = sum(j for j, _ in done.values() if j is not None)
    # No idle interval seen yet (baseline 0 W): both intervals' 300 W are theirs, the busy one
    # and the one after it (the counter lags the work).
    assert abs(total - 300 * 0.2) < 1e-6


def test_a_request_deferred_after_its_energy_is_known_completes_at_once() -> None:
    now = [0]
    energy, sample = tracker(now)
    sample()
    energy.start("late", "u", ("m", "u", "t"), 10, False)
    now[0] = 50 * MS
    energy.end("late")
    for k in (1, 2):
        now[0] = k * 100 * MS
        sample()
    done: list[float | None] = []
    assert energy.defer("late", lambda j, g: done.append(j))
    assert done and done[0] is not None and done[0] > 0


def test_a_request_whose_gpu_stops_reporting_completes_unknown_at_its_deadline() -> None:
    now = [0]
    energy, sample = tracker(now)
    sample()
    energy.start("a", "u", ("m", "u", "t"), 10, False)
    energy.end("a")
    done: list[float | None] = []
    assert energy.defer("a", lambda j, g: done.append(j))
    now[0] = 1900 * MS
    energy.check_stalled()  # the source is down: nothing will come
    assert done == [None]


def test_a_request_whose_other_gpu_stops_reporting_completes_unknown_at_its_deadline() -> None:
    """The source is up (GPU 0 reports), but the request's GPU 1 never closes its interval: the
    next reading after its deadline completes it, energy unknown, and leaves the rest parked."""
    now = [0]
    clock = lambda: now[0]  # noqa: E731
    fake = FakeNvml(
        {"0": lambda t: t * 300_000.0, "1": lambda t: t * 300_000.0}, clock=lambda: now[0] / 1e9
    )
    source = NvmlSource(fake, ["0", "1"], clock)
    energy = EnergyTracker(
        source, {"u": ("0", "1")}, Metrics(CollectorRegistry()), clock, Weights(), 0.1
    )

    def sample(gpus: tuple[str, ...] = ("0", "1")) -> None:
        energy.on_readings([r for r in source.read() if r.gpu in gpus])

    sample()
    done: dict[str, float | None] = {}
    energy.start("a", "u", ("m", "u", "t"), 10, False)
    now[0] = 50 * MS
    energy.end("a")
    assert energy.defer("a", lambda j, g: done.__setitem__("a", j))
    for k in range(1, 20):  # to 1.9 s: GPU 1 has stopped; the deadline (2 s) is not reached
        now[0] = k * 100 * MS
        sample(("0",))
    energy.start("b", "u", ("m", "u", "t"), 10, False)
    energy.end("b")
    assert energy.defer("b", lambda j, g: done.__setitem__("b", j))
    assert not done
    now[0] = 2100 * MS
    sample(("0",))
    assert done == {"a": None}  # b's deadline is still ahead
    for k in (22, 23):
        now[0] = k * 100 * MS
        sample()  # GPU 1 is back: b's interval closes on both GPUs
    assert done["b"] is not None and done["b"] > 0


def parked_burst(now: list[int], n: int) -> tuple[EnergyTracker, Callable[[], None], list[str]]:
    """A tracker with `n` parked requests that the second reading makes final."""
    energy, sample = tracker(now)
    sample()
    done: list[str] = []
    for i in range(n):
        energy.start(f"k{i}", "u", ("m", "u", "t"), 10, False)
        energy.end(f"k{i}")
        assert energy.defer(f"k{i}", lambda j, g, i=i: done.append(f"k{i}"))
    for k in (1, 2):
        now[0] = k * 100 * MS
        sample()
    return energy, sample, done


def a_request_ends(energy: EnergyTracker, key: str) -> None:
    energy.start(key, "u", ("m", "u", "t"), 10, False)
    energy.end(key)
    assert energy.defer(key, lambda j, g: None)


async def test_a_burst_of_completions_is_handed_over_a_slice_per_request_that_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hundreds of requests made final by one reading are settled a slice at a time: one at
    the next turn of the loop after each metered request ends, not in the request's own
    callback and not at every turn, so a request in flight meets a slice at most once."""
    monkeypatch.setattr(tracker_module, "PULSE_S", 3600.0)  # no idle pulse in this test
    energy, _, done = parked_burst([0], 200)
    assert len(done) == handed_per_pulse(200)  # the reading's own pulse
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(done) == handed_per_pulse(200)  # turns of the loop alone hand nothing over
    for n in range(3):
        before = len(done)
        a_request_ends(energy, f"r{n}")
        assert len(done) == before  # not in the request's own callback
        await asyncio.sleep(0)
        assert len(done) == before + handed_per_pulse(200 - before)
    energy.close()


async def test_with_no_request_ending_the_idle_pulse_hands_every_completion_over() -> None:
    energy, _, done = parked_burst([0], 200)
    for _ in range(2000):
        if len(done) == 200:
            break
        await asyncio.sleep(PULSE_S)
    assert sorted(done) == sorted(f"k{i}" for i in range(200))
    energy.close()
    assert len(done) == 200  # each once


async def test_completions_are_handed_over_while_a_long_interval_is_still_closing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pulse takes a closing step and then a hand-over slice: an interval that takes many
    steps to close (many GPUs, many requests in flight) never starves the completions."""
    monkeypatch.setattr(tracker_module, "PULSE_S", 3600.0)  # pulses only as requests end
    now = [0]
    energy, sample, done = parked_burst(now, 100)
    for i in range(20 * SHARES_PER_STEP):  # streams in flight: the next interval is a long close
        energy.start(f"s{i}", "u", ("m", "u", "t"), 10, True)
    now[0] = 300 * MS
    sample()
    handed = len(done)
    for n in range(5):
        a_request_ends(energy, f"r{n}")
        await asyncio.sleep(0)
        assert energy.engine.closing  # still closing...
        assert len(done) > handed  # ...and a slice went over all the same
        handed = len(done)
    energy.close()


def test_a_busy_interval_closes_a_step_at_a_time_to_the_same_joules() -> None:
    """On the loop a reading closes SHARES_PER_STEP shares a pulse; a request that starts and
    streams meanwhile (moving the engine's learned step time) changes nothing it closes: the
    joules are those of the same events with the whole interval closed at once (no loop)."""

    def run() -> tuple[dict[str, float | None], list[bool]]:
        now = [0]
        energy, sample = tracker(now)
        sample()
        joules: dict[str, float | None] = {}
        closing: list[bool] = []
        n = 3 * SHARES_PER_STEP + 5
        for i in range(n):
            energy.start(f"k{i}", "u", ("m", "u", "t"), 10 + i, i % 2 == 0)
            if i % 2 == 0:
                energy.first_token(f"k{i}", now[0] + i * 1000)
        now[0] = 60 * MS
        for i in range(0, n, 2):
            energy.decoded(f"k{i}", 1 + i % 5)
        for i in range(n // 2):
            energy.end(f"k{i}")
            assert energy.defer(f"k{i}", lambda j, g, i=i: joules.__setitem__(f"k{i}", j))
        for k in (1, 2, 3, 4):
            now[0] = k * 100 * MS
            sample()
            closing.append(energy.engine.closing)
            # A request starts and streams, its token gaps teaching the engine's pace: between
            # two of the closing's steps on the loop, after the whole closing without one.
            energy.start(f"x{k}", "u", ("m", "u", "t"), 10, True)
            energy.decoded(f"x{k}", 3)
            now[0] += MS // 2
            energy.decoded(f"x{k}", 2)
            energy.engine.finish_closing()
            energy.end(f"x{k}")
            if k == 2:
                for i in range(n // 2, n):
                    energy.end(f"k{i}")
                    assert energy.defer(f"k{i}", lambda j, g, i=i: joules.__setitem__(f"k{i}", j))
        energy.close()
        return {k: v for k, v in joules.items() if k.startswith("k")}, closing

    async def on_the_loop() -> tuple[dict[str, float | None], list[bool]]:
        return run()

    whole, closing_whole = run()
    stepped, closing_stepped = asyncio.run(on_the_loop())
    assert not any(closing_whole)  # without a loop a reading closes its interval at once
    assert closing_stepped[0]  # on the loop the first busy interval is still closing
    assert len(whole) == len(stepped) == 3 * SHARES_PER_STEP + 5
    for key, j in whole.items():
        assert j is not None and stepped[key] is not None
        assert abs(stepped[key] - j) < 1e-9, key


def test_a_pulse_hands_over_one_completion_or_a_share_of_a_long_backlog() -> None:
    """One a pulse at the pace of a request in flight; under load, where one a pulse could
    fall behind the requests that end, at least a BACKLOG_PULSES-th of the backlog."""
    assert handed_per_pulse(1) == handed_per_pulse(BACKLOG_PULSES - 1) == COMPLETIONS_PER_PULSE == 1
    assert handed_per_pulse(100 * BACKLOG_PULSES) == 100
    backlog, pulses = 100_000, 0
    while backlog:
        backlog -= min(backlog, handed_per_pulse(backlog))
        pulses += 1
    assert pulses < 12 * BACKLOG_PULSES  # ~ BACKLOG_PULSES x (ln(100,000 / 64) + 1)


def test_the_fit_is_exported_in_use_from_the_first_busy_window_and_trusted_later() -> None:
    now, tokens = [0], [0]
    registry = CollectorRegistry()
    # 100 W idle, 2 J per decoded token: energy that follows the work the proxy sees.
    fake = FakeNvml(
        {"0": lambda t: t * 100_000.0 + tokens[0] * 2_000.0}, clock=lambda: now[0] / 1e9
    )
    source = NvmlSource(fake, ["0"], lambda: now[0])
    energy = EnergyTracker(source, {"u": ("0",)}, Metrics(registry), lambda: now[0], Weights(), 0.1)

    def gauge(name: str) -> float | None:
        return registry.get_sample_value(f"meterproxy_gpu_energy_model_{name}", {"gpu": "0"})

    seen: list[tuple[float | None, float | None]] = []
    for step in range(200):  # 20 s: a request streams for 0.7 s of every second
        now[0] = step * 100 * MS
        if step % 10 == 0:
            energy.start(f"k{step}", "u", ("m", "u", "t"), 50, True)
            energy.first_token(f"k{step}", now[0])
        elif step % 10 < 8:
            n = 5 + step % 7
            energy.decoded(f"k{step - step % 10}", n)
            tokens[0] += n
        elif step % 10 == 8:
            energy.end(f"k{step - 8}")
        energy.on_readings(source.read())
        seen.append((gauge("in_use"), gauge("trusted")))
    first_use = next(i for i, (in_use, _) in enumerate(seen) if in_use == 1.0)
    first_trust = next(i for i, (_, trusted) in enumerate(seen) if trusted == 1.0)
    assert first_use <= 20  # within the first two windows of work
    assert seen[first_use][1] == 0.0  # in use while still young
    assert first_trust > first_use + 80  # backed by data only after 10 busy windows
    decode = registry.get_sample_value(
        "meterproxy_gpu_energy_model", {"gpu": "0", "term": "decode_j"}
    )
    assert decode is not None and abs(decode - 2.0) < 0.2


def test_no_fit_error_is_exported_before_the_fit_has_one() -> None:
    """An unset gauge reads 0, which for the fit's error would say "exact": the series appears
    only once the fit has measured an error."""
    now = [0]
    energy, sample = tracker(now)
    registry = energy.metrics.registry
    for step in range(1, 4):
        now[0] = step * 100 * MS
        sample()
    assert registry.get_sample_value("meterproxy_gpu_energy_model_windows", {"gpu": "0"}) == 0
    assert (
        registry.get_sample_value("meterproxy_gpu_energy_model_error_ratio", {"gpu": "0"}) is None
    )
