"""Energy sources behind one small interface: cumulative energy per GPU, in millijoules, with
the time it was read, plus power for display. Sources are synchronous: they run on the sampler
thread, never on the event loop.

    EnergyError
    ├── SourceUnavailable   no driver, no library, no exporter: energy is disabled
    ├── GpuNotFound         a configured GPU index or UUID is not there
    └── ReadFailed          a reading failed (the source shows as down until one succeeds)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class EnergyError(Exception):
    pass


class SourceUnavailable(EnergyError):
    pass


class GpuNotFound(EnergyError):
    pass


class ReadFailed(EnergyError):
    pass


@dataclass(frozen=True)
class Reading:
    gpu: str  # as configured: an index ("0") or a UUID
    t_ns: int  # monotonic time of the reading
    energy_mj: int  # cumulative, since some origin (driver load, exporter start)
    power_w: float | None = None


class Source(Protocol):
    @property
    def name(self) -> str:
        """The metrics label: nvml, nvml-power, dcgm, simulated."""
        ...

    def read(self) -> list[Reading]: ...

    def board_w(self, gpu: str) -> float | None: ...

    def close(self) -> None: ...
