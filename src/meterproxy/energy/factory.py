"""Choose and open the configured energy source; a missing driver or library is one clear log
line and energy disabled, never a crash."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .dcgm import DcgmSource
from .nvml import NvmlSource, load_pynvml
from .settings import EnergySettings
from .simulated import SimulatedGpus
from .sources import EnergyError, Source

log = logging.getLogger(__name__)


def open_source(
    settings: EnergySettings, gpus: Sequence[str], clock: Callable[[], int] = time.monotonic_ns
) -> Source | None:
    kind = settings.source
    if kind == "none":
        return None
    if not gpus:
        if kind != "auto":
            log.warning("energy.source is %s but no upstream lists `gpus`; energy is off", kind)
        return None
    try:
        if kind == "simulated":
            return SimulatedGpus(gpus, settings.simulated, clock)
        if kind == "dcgm":
            assert settings.dcgm_url is not None
            return DcgmSource(settings.dcgm_url, gpus, clock=clock)
        return NvmlSource(load_pynvml(), gpus, clock)
    except EnergyError as exc:
        if kind == "auto":
            log.info("no GPU energy source (%s); energy metering is off", exc)
        else:
            log.error("energy source %s is unavailable: %s; energy metering is off", kind, exc)
        return None
