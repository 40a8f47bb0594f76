"""NVML: each GPU's total-energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ since driver
load, Volta and newer). Where the counter is not supported, instantaneous power
(NVML_FI_DEV_POWER_INSTANT; the plain power reading is a 1 s average on Ampere and newer) is
integrated, and the source says so in its name. NVML errors are mapped through one table.

The module is injected (`pynvml` from nvidia-ml-py in production, a fake in tests); calls happen
only on the sampler thread. Processes are never enumerated: that takes a driver-wide lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from .sources import EnergyError, GpuNotFound, ReadFailed, Reading, SourceUnavailable

# NVML return code -> (our error, what to do about it)
_ERRORS: dict[str, tuple[type[EnergyError], str]] = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": (SourceUnavailable, "libnvidia-ml is not installed"),
    "NVML_ERROR_DRIVER_NOT_LOADED": (SourceUnavailable, "the NVIDIA driver is not loaded"),
    "NVML_ERROR_NO_PERMISSION": (SourceUnavailable, "no permission to read the GPU"),
    "NVML_ERROR_NOT_FOUND": (GpuNotFound, "no such GPU"),
    "NVML_ERROR_INVALID_ARGUMENT": (GpuNotFound, "no such GPU"),
    "NVML_ERROR_GPU_IS_LOST": (ReadFailed, "the GPU fell off the bus"),
    "NVML_ERROR_TIMEOUT": (ReadFailed, "NVML timed out"),
    "NVML_ERROR_UNINITIALIZED": (ReadFailed, "NVML is not initialized"),
}


def translate(nvml: ModuleType, exc: Exception, what: str) -> EnergyError:
    code = getattr(exc, "value", None)
    for name, (kind, reason) in _ERRORS.items():
        if code is not None and code == getattr(nvml, name, object()):
            return kind(f"{what}: {reason} (NVML error {code})")
    return ReadFailed(f"{what}: {exc}")


class NvmlSource:
    def __init__(
        self, nvml: ModuleType, gpus: Sequence[str], clock: Callable[[], int] = time.monotonic_ns
    ) -> None:
        self._nvml, self._clock = nvml, clock
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise translate(nvml, exc, "NVML") from None
        self._handles: dict[str, Any] = {}
        for gpu in gpus:
            try:
                if gpu.isdigit():
                    handle = nvml.nvmlDeviceGetHandleByIndex(int(gpu))
                else:
                    handle = nvml.nvmlDeviceGetHandleByUUID(gpu)
            except nvml.NVMLError as exc:
                raise translate(nvml, exc, f"GPU {gpu}") from None
            self._handles[gpu] = handle
        self._power_mode: set[str] = set()  # GPUs without the energy counter
        self._integrated: dict[str, tuple[int, float]] = {}  # gpu -> (t_ns, mJ so far)
        self._board: dict[str, float | None] = {}
        for gpu, handle in self._handles.items():
            try:
                self._board[gpu] = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
            except nvml.NVMLError:
                self._board[gpu] = None
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            except nvml.NVMLError_NotSupported:
                self._power_mode.add(gpu)
            except nvml.NVMLError as exc:
                raise translate(nvml, exc, f"GPU {gpu}") from None

    @property
    def name(self) -> str:
        return "nvml-power" if self._power_mode else "nvml"

    def board_w(self, gpu: str) -> float | None:
        return self._board.get(gpu)

    def read(self) -> list[Reading]:
        nvml, readings = self._nvml, []
        for gpu, handle in self._handles.items():
            try:
                if gpu in self._power_mode:
                    readings.append(self._integrate(gpu, handle))
                else:
                    mj = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                    readings.append(Reading(gpu, self._clock(), int(mj)))
            except nvml.NVMLError as exc:
                raise translate(nvml, exc, f"GPU {gpu}") from None
        return readings

    def _integrate(self, gpu: str, handle: Any) -> Reading:
        nvml = self._nvml
        [value] = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])
        if value.nvmlReturn != 0:
            raise nvml.NVMLError(value.nvmlReturn)
        watts = value.value.uiVal / 1000
        now = self._clock()
        last = self._integrated.get(gpu)
        total = 0.0 if last is None else last[1] + watts * (now - last[0]) / 1e6
        self._integrated[gpu] = (now, total)
        return Reading(gpu, now, int(total), watts)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass


def load_pynvml() -> ModuleType:
    import importlib

    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise SourceUnavailable(
            "the pynvml module is missing: pip install 'meterproxy[gpu]' (nvidia-ml-py)"
        ) from None
