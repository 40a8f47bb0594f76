"""What energy sampling costs: the sampler thread reading 8 GPUs at 10 Hz through NVML (the
fake pynvml here; the real library adds its own driver calls) and the loop-side attribution.

    python benchmarks/sampler_cost.py
"""

from __future__ import annotations

import asyncio
import resource
import time

from prometheus_client import CollectorRegistry

from meterproxy.energy.attribution import Weights
from meterproxy.energy.nvml import NvmlSource
from meterproxy.energy.sampler import Sampler
from meterproxy.energy.tracker import EnergyTracker
from meterproxy.metrics import Metrics
from meterproxy.sim.pynvml_fake import FakeNvml

GPUS = [str(i) for i in range(8)]
SECONDS = 10.0


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main() -> None:
    t0 = time.monotonic()
    fake = FakeNvml({g: (lambda t, w=300 + 10 * int(g): (t - t0) * w * 1000) for g in GPUS})
    source = NvmlSource(fake, GPUS)
    tracker = EnergyTracker(
        source,
        {"vllm": tuple(GPUS)},
        Metrics(CollectorRegistry()),
        time.monotonic_ns,
        Weights(),
        0.1,
    )
    sampler = Sampler(
        source, 0.1, asyncio.get_running_loop(), tracker.on_readings, tracker.on_error
    )
    await asyncio.sleep(0.5)
    before, calls = cpu_s(), fake.calls
    sampler.start()
    await asyncio.sleep(SECONDS)
    sampler.stop()
    used = cpu_s() - before
    print(
        f"8 GPUs at 10 Hz for {SECONDS:.0f} s: {fake.calls - calls} NVML reads, "
        f"{used * 1000 / SECONDS:.2f} ms of CPU per second ({used / SECONDS:.2%} of one core)"
    )


if __name__ == "__main__":
    asyncio.run(main())
