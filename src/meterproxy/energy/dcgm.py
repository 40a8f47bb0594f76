"""DCGM: scrape a dcgm-exporter (for proxies that do not share a host with their GPUs).

`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` is a mJ counter, `DCGM_FI_DEV_POWER_USAGE` watts. The
exporter collects every 30 s by default; run it with `-c 1000` (or less) for per-request figures.
Scrapes are plain blocking HTTP on the sampler thread, never on the event loop.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from .sources import GpuNotFound, ReadFailed, Reading

_LINE = re.compile(
    r"^(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION|DCGM_FI_DEV_POWER_USAGE)"
    r"\{([^}]*)\}\s+([0-9.eE+-]+)"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[str, tuple[float | None, float | None]]:
    """gpu key -> (energy mJ, power W); a GPU is known by its `gpu` index and its `UUID`."""
    out: dict[str, list[float | None]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        slot = 0 if m.group(1).endswith("CONSUMPTION") else 1
        for key in (labels.get("gpu"), labels.get("UUID")):
            if key:
                out.setdefault(key, [None, None])[slot] = float(m.group(3))
    return {k: (v[0], v[1]) for k, v in out.items()}


class DcgmSource:
    name = "dcgm"

    def __init__(
        self,
        url: str,
        gpus: Sequence[str],
        timeout_s: float = 2.0,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.url, self.gpus, self.timeout_s, self._clock = url, list(gpus), timeout_s, clock
        found = self._scrape()
        missing = [g for g in self.gpus if g not in found or found[g][0] is None]
        if missing:
            raise GpuNotFound(
                f"{url} reports no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION for GPU "
                f"{', '.join(missing)}"
            )

    def _scrape(self) -> dict[str, tuple[float | None, float | None]]:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                return parse(response.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ReadFailed(f"DCGM exporter {self.url}: {exc}") from None

    def read(self) -> list[Reading]:
        found, now = self._scrape(), self._clock()
        out = []
        for gpu in self.gpus:
            energy, power = found.get(gpu, (None, None))
            if energy is None:
                raise ReadFailed(f"DCGM exporter {self.url} no longer reports GPU {gpu}")
            out.append(Reading(gpu, now, int(energy), power))
        return out

    def board_w(self, gpu: str) -> float | None:
        return None

    def close(self) -> None:
        pass
