"""The sampler thread over a real NVML source (on the shared fake pynvml): readings reach the
event loop, and a source that fails, or has a bug, is reported and keeps being read."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable

import pytest

from meterproxy.energy.nvml import NvmlSource
from meterproxy.energy.sampler import MIN_INTERVAL_S, Sampler
from meterproxy.energy.sources import EnergyError, ReadFailed, Reading
from meterproxy.sim.pynvml_fake import FakeNvml


class Gpu:
    """One GPU's energy counter, which can be made to fail."""

    def __init__(self) -> None:
        self.mode = "ok"  # ok | lost (NVML reports the GPU lost) | bug (the trace raises)
        self.nvml = FakeNvml({"0": self.trace})

    def trace(self, t_s: float) -> float:
        if self.mode == "bug":
            raise ZeroDivisionError("a bug in the source")
        return t_s * 300_000.0  # 300 W

    def set(self, mode: str) -> None:
        self.mode = mode
        self.nvml.lost_after_s = 0.0 if mode == "lost" else None


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


async def test_readings_and_errors_reach_the_loop_and_the_thread_survives_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gpu = Gpu()
    source = NvmlSource(gpu.nvml, ["0"])
    readings: list[Reading] = []
    errors: list[EnergyError] = []
    threads: set[int] = set()

    def on_readings(batch: list[Reading]) -> None:
        threads.add(threading.get_ident())
        readings.extend(batch)

    def on_error(exc: EnergyError) -> None:
        threads.add(threading.get_ident())
        errors.append(exc)

    sampler = Sampler(source, 0.0, asyncio.get_running_loop(), on_readings, on_error)
    sampler.start()
    try:
        await until(lambda: len(readings) >= 1)
        assert readings[0].gpu == "0" and readings[0].energy_mj > 0
        gpu.set("lost")
        await until(lambda: len(errors) >= 1)
        assert isinstance(errors[0], ReadFailed) and "fell off the bus" in str(errors[0])
        with caplog.at_level(logging.ERROR, logger="meterproxy.energy.sampler"):
            gpu.set("bug")
            await until(lambda: any("a bug in the source" in str(e) for e in errors))
        assert any("energy source nvml failed" in r.getMessage() for r in caplog.records)
        seen = len(readings)
        gpu.set("ok")
        await until(lambda: len(readings) > seen)
        assert sampler._thread.is_alive()
        assert readings[-1].energy_mj >= readings[0].energy_mj
    finally:
        await asyncio.get_running_loop().run_in_executor(None, sampler.stop)
    assert not sampler._thread.is_alive()
    assert threads == {threading.get_ident()}  # every callback ran on the loop's thread


async def test_the_interval_is_never_below_the_nvml_minimum() -> None:
    gpu = Gpu()
    times: list[float] = []
    sampler = Sampler(
        NvmlSource(gpu.nvml, ["0"]),
        0.001,
        asyncio.get_running_loop(),
        lambda batch: times.append(time.monotonic()),
        lambda exc: None,
    )
    sampler.start()
    try:
        await until(lambda: len(times) >= 3)
    finally:
        await asyncio.get_running_loop().run_in_executor(None, sampler.stop)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= MIN_INTERVAL_S * 0.8  # scheduling noise, never 1 ms
