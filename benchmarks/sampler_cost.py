"""What energy metering costs: the sampler thread reading 8 GPUs at 10 Hz through NVML (the fake
pynvml here; the real library adds its own driver calls), the attribution and self-calibration
on the loop, and the per-request events of a steady load (16 streams per GPU, one token per
20 ms engine step each, a new request whenever one finishes).

    python benchmarks/sampler_cost.py [--seconds 10] [--streams 16]

Prints CPU per second of wall time, as a share of one core (thread CPU time, so that a busy
shared machine does not inflate it): the sampler thread's CPU inside its reads plus the loop's
CPU in the readings callback (attribution, fit, metrics), with no
traffic and with the load; and the time inside the request events, on their own.
Target: under 1 % of one core at 8 GPUs and 10 Hz.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from meterproxy.energy.attribution import Weights
from meterproxy.energy.nvml import NvmlSource
from meterproxy.energy.sampler import Sampler
from meterproxy.energy.sources import Reading
from meterproxy.energy.tracker import EnergyTracker
from meterproxy.metrics import Metrics
from meterproxy.sim.pynvml_fake import FakeNvml

T = TypeVar("T")

GPUS = [str(i) for i in range(8)]
STEP_S = 0.02


class TimedSource:
    """The NVML source, with the sampler thread's CPU time inside `read` counted."""

    def __init__(self, inner: NvmlSource) -> None:
        self.inner, self.cpu_s = inner, 0.0
        self.name = inner.name

    def read(self) -> list[Reading]:
        t = time.thread_time()
        try:
            return self.inner.read()
        finally:
            self.cpu_s += time.thread_time() - t

    def board_w(self, gpu: str) -> float | None:
        return self.inner.board_w(gpu)

    def close(self) -> None:
        self.inner.close()


class Timed:
    """Forwards request events to the tracker and times them (the request path's share)."""

    def __init__(self, tracker: EnergyTracker) -> None:
        self.tracker, self.spent_s, self.events = tracker, 0.0, 0

    def __getattr__(self, name: str) -> object:
        method = getattr(self.tracker, name)

        def timed(*args: object) -> object:
            t = time.thread_time()
            try:
                return method(*args)
            finally:
                self.spent_s += time.thread_time() - t
                self.events += 1

        return timed


async def drive(backend: object, streams: int, seconds: float) -> int:
    """Each GPU (its own upstream) runs `streams` requests of 200 tokens; returns requests."""
    b: Any = backend
    live: dict[str, list[list[object]]] = {gpu: [] for gpu in GPUS}
    serial = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for gpu, running in live.items():
            while len(running) < streams:
                serial += 1
                key = f"{gpu}:{serial}"
                b.start(key, f"up{gpu}", ("m", f"up{gpu}", "t"), 500, True)
                b.first_token(key, time.monotonic_ns())
                running.append([key, 0])
            for item in list(running):
                key = str(item[0])
                b.decoded(key, 1)
                item[1] = int(str(item[1])) + 1
                if item[1] == 200:
                    b.usage(key, 500, 0, 200)
                    b.end(key)
                    if hasattr(b, "defer"):
                        b.defer(key, lambda energy_j, gpu_s: None)
                    running.remove(item)
        await asyncio.sleep(STEP_S)
    return serial


async def measure(streams: int, seconds: float) -> dict[str, float]:
    t0 = time.monotonic()
    fake = FakeNvml({g: (lambda t, w=300 + 10 * int(g): (t - t0) * w * 1000) for g in GPUS})
    source = TimedSource(NvmlSource(fake, GPUS))
    spent = [0.0]
    depth = [0]

    class TimedTracker(EnergyTracker):
        """Times the readings and the pulses that close their intervals and hand completions
        over (later turns of the loop), each once."""

        def on_readings(self, readings: list[Reading]) -> None:
            self._timed(super().on_readings, readings)

        def _pulse(self, by: str = "") -> None:
            self._timed(super()._pulse, by)

        @staticmethod
        def _timed(fn: Callable[[T], None], arg: T) -> None:
            depth[0] += 1
            t = time.thread_time()
            try:
                fn(arg)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent[0] += time.thread_time() - t

    tracker = TimedTracker(
        source,
        {f"up{g}": (g,) for g in GPUS},
        Metrics(CollectorRegistry()),
        time.monotonic_ns,
        Weights(),
        0.1,
    )
    loop = asyncio.get_running_loop()
    sampler = Sampler(source, 0.1, loop, tracker.on_readings, tracker.on_error)
    sampler.start()
    await asyncio.sleep(0.5)
    out: dict[str, float] = {}
    for phase in ("quiet", "loaded"):
        read0, loop0 = source.cpu_s, spent[0]
        timed = Timed(tracker)
        if phase == "quiet":
            await asyncio.sleep(seconds)
        else:
            out["requests"] = await drive(timed, streams, seconds)
        out[phase] = (source.cpu_s - read0 + spent[0] - loop0) / seconds
        out[f"{phase}_events"] = timed.spent_s / seconds
        out[f"{phase}_rate"] = timed.events / seconds
    sampler.stop()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=16, help="streams per GPU")
    args = parser.parse_args()
    m = await measure(args.streams, args.seconds)
    print(f"8 GPUs at 10 Hz, no traffic: sampler + attribution {m['quiet']:.2%} of one core")
    print(
        f"8 GPUs at 10 Hz, {args.streams} streams per GPU ({m['requests']:.0f} requests): "
        f"sampler + attribution {m['loaded']:.2%} of one core; the request path's energy "
        f"events ({m['loaded_rate']:.0f}/s) {m['loaded_events']:.2%}, "
        f"{m['loaded_events'] / m['loaded_rate'] * 1e6:.1f} us each"
    )
    print("Target: sampler and attribution under 1 % of one core at 8 GPUs and 10 Hz.")


if __name__ == "__main__":
    asyncio.run(main())
