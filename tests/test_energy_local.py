"""The in-process energy backend: every event is ignored until it is open and whenever no source
was found; once open over a source, events are delegated and a finished request's joules come
back once its GPU has been sampled past its end."""

from __future__ import annotations

import asyncio
import threading
import time

from prometheus_client import CollectorRegistry

from meterproxy.energy.attribution import Weights
from meterproxy.energy.local import LocalEnergy
from meterproxy.energy.simulated import SimulatedGpus, SimulatedGpuSpec
from meterproxy.energy.sources import Source
from meterproxy.metrics import Metrics

GPUS = {"gpu-up": ("0",), "cpu-up": ()}
GROUP = ("m", "gpu-up", "research")


def backend(
    source: Source | None, registry: CollectorRegistry | None = None
) -> tuple[LocalEnergy, list[int]]:
    opened: list[int] = []

    def opener() -> Source | None:
        opened.append(threading.get_ident())
        return source

    energy = LocalEnergy(
        opener,
        GPUS,
        Metrics(registry or CollectorRegistry()),
        time.monotonic_ns,
        Weights(),
        0.1,
    )
    return energy, opened


def a_request(energy: LocalEnergy, key: str, upstream: str = "gpu-up") -> None:
    energy.start(key, upstream, GROUP, 40, True)
    energy.first_token(key, time.monotonic_ns())
    energy.decoded(key, 12)
    energy.usage(key, 40, 0, 12)
    energy.end(key)


def samplers() -> int:
    return sum(t.name == "energy-sampler" and t.is_alive() for t in threading.enumerate())


async def test_events_before_open_are_ignored_and_nothing_waits() -> None:
    gpus = SimulatedGpus(["0"], SimulatedGpuSpec())
    energy, opened = backend(gpus)
    assert energy.source is None and energy.tracker is None
    a_request(energy, "mp-early")
    assert energy.defer("mp-early", lambda j, s: None) is False
    await energy.open()
    try:
        # A request that started before the source opened is not followed afterwards either.
        assert energy.defer("mp-early", lambda j, s: None) is False
        assert energy.source is gpus
    finally:
        await energy.close()
    assert opened and opened[0] != threading.get_ident()  # opened off the loop


async def test_without_a_source_every_event_is_ignored() -> None:
    before = samplers()
    energy, opened = backend(None)
    await energy.open()
    assert len(opened) == 1 and energy.tracker is None and samplers() == before
    a_request(energy, "mp-1")
    assert energy.defer("mp-1", lambda j, s: None) is False
    await asyncio.wait_for(energy.watchdog(), 1.0)  # nothing to watch: returns at once
    await energy.close()


async def test_once_open_a_request_gets_its_measured_energy() -> None:
    registry = CollectorRegistry()
    before = samplers()
    energy, _ = backend(SimulatedGpus(["0"], SimulatedGpuSpec()), registry)
    await energy.open()
    assert samplers() == before + 1
    try:
        assert (
            registry.get_sample_value("meterproxy_energy_source_up", {"source": "simulated"}) == 1.0
        )
        results: list[tuple[float | None, float]] = []
        finished = asyncio.Event()

        def done(joules: float | None, gpu_seconds: float) -> None:
            results.append((joules, gpu_seconds))
            finished.set()

        a_request(energy, "mp-1")
        await asyncio.sleep(0.05)
        assert energy.defer("mp-1", done) is True
        assert energy.defer("mp-1", done) is False  # once per request
        await asyncio.wait_for(finished.wait(), 2.0)
        [(joules, gpu_seconds)] = results
        assert joules is not None and joules > 0 and gpu_seconds >= 0
        # An upstream without GPUs is not metered: nothing to wait for.
        a_request(energy, "mp-2", "cpu-up")
        assert energy.defer("mp-2", done) is False
    finally:
        await energy.close()
    assert samplers() == before
