"""A fake `pynvml` for machines without a GPU: the same function names, constants and error
classes (the real ones, from nvidia-ml-py, when it is installed), driven by energy traces with
a known answer and an injectable clock.

    fake = FakeNvml({"0": twin.counter_mj}, clock=lambda: t)   # mJ at a time in seconds
    source = NvmlSource(fake, ["0"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:
    import pynvml as _real
except ImportError:  # pragma: no cover - nvidia-ml-py is a dev dependency
    _real = None

Trace = Callable[[float], float]  # seconds -> cumulative mJ


class _FallbackError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


NVMLError: Any = _real.NVMLError if _real is not None else _FallbackError


def _error(code: int) -> Exception:
    error: Exception = NVMLError(code)  # pynvml maps the code to its NVMLError_* subclass
    return error


@dataclass
class _Value:
    uiVal: int


@dataclass
class _FieldValue:
    fieldId: int
    nvmlReturn: int
    value: _Value


class FakeNvml:
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_FI_DEV_POWER_INSTANT = 186

    def __init__(
        self,
        traces: dict[str, Trace],
        *,
        clock: Callable[[], float] = time.monotonic,
        energy_counter: bool = True,
        board_w: float = 700.0,
        driver_loaded: bool = True,
        lost_after_s: float | None = None,
    ) -> None:
        self.traces, self.clock = traces, clock
        self.energy_counter, self.board_w = energy_counter, board_w
        self.driver_loaded, self.lost_after_s = driver_loaded, lost_after_s
        self.calls = 0
        self.NVMLError = NVMLError
        self.NVMLError_NotSupported = getattr(_real, "NVMLError_NotSupported", NVMLError)
        self._uuids = {f"GPU-{int(i):08d}-fake": i for i in traces if i.isdigit()}

    def _check(self) -> None:
        self.calls += 1
        if self.lost_after_s is not None and self.clock() >= self.lost_after_s:
            raise _error(self.NVML_ERROR_GPU_IS_LOST)

    def nvmlInit(self) -> None:
        if not self.driver_loaded:
            raise _error(self.NVML_ERROR_DRIVER_NOT_LOADED)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.traces)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if str(index) not in self.traces:
            raise _error(self.NVML_ERROR_INVALID_ARGUMENT)
        return str(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if uuid not in self._uuids:
            raise _error(self.NVML_ERROR_NOT_FOUND)
        return self._uuids[uuid]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        return int(self.board_w * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        self._check()
        if not self.energy_counter:
            raise _error(self.NVML_ERROR_NOT_SUPPORTED)
        return int(self.traces[handle](self.clock()))

    def nvmlDeviceGetFieldValues(self, handle: str, ids: list[int]) -> list[_FieldValue]:
        self._check()
        out = []
        for field_id in ids:
            if field_id != self.NVML_FI_DEV_POWER_INSTANT:
                out.append(_FieldValue(field_id, self.NVML_ERROR_NOT_SUPPORTED, _Value(0)))
                continue
            now, dt = self.clock(), 0.001
            watts = (self.traces[handle](now) - self.traces[handle](now - dt)) / dt / 1000
            out.append(_FieldValue(field_id, 0, _Value(int(watts * 1000))))
        return out
