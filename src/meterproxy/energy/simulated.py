"""A simulated GPU for the demo and tests, driven by the proxy's own traffic: idle power, plus
weight-streaming power while anything is resident, plus energy per token generated, capped at
the board limit. The real counter's artifacts are available as options."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .sources import Reading


@dataclass(frozen=True)
class SimulatedGpuSpec:
    idle_w: float = 70.0
    busy_w: float = 280.0  # weight streaming while requests are in the engine
    token_mj: float = 60.0  # per generated token
    prefill_mj: float = 25.0  # per prompt token
    board_w: float = 700.0
    step_ms: int = 0  # the counter moves only on this grid (NVML: about 100 ms)
    gain: float = 1.0  # sensor gain error
    reset_every_s: float | None = None  # driver reloads


class SimulatedGpus:
    name = "simulated"

    def __init__(
        self,
        gpus: Sequence[str],
        spec: SimulatedGpuSpec,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.spec, self._clock = spec, clock
        self._lock = threading.Lock()  # work arrives from the loop, reads from the sampler
        self._busy: dict[str, int] = {g: 0 for g in gpus}
        self._work_mj: dict[str, float] = {g: 0.0 for g in gpus}
        self._true_mj: dict[str, float] = {g: 0.0 for g in gpus}
        self._last_ns = clock()
        self._next_reset_ns = (
            self._last_ns + int(spec.reset_every_s * 1e9) if spec.reset_every_s else None
        )
        self._origin: dict[str, float] = {g: 0.0 for g in gpus}

    # -- driven by the proxy's traffic (event loop) ---------------------------------------

    def busy(self, gpus: Sequence[str], delta: int) -> None:
        with self._lock:
            self._advance()
            for g in gpus:
                if g in self._busy:
                    self._busy[g] += delta

    def work(self, gpus: Sequence[str], prompt_tokens: int = 0, tokens: int = 0) -> None:
        with self._lock:
            for g in gpus:
                if g in self._work_mj:
                    self._work_mj[g] += (
                        prompt_tokens * self.spec.prefill_mj + tokens * self.spec.token_mj
                    )

    # -- read by the sampler thread -------------------------------------------------------

    def _advance(self) -> None:
        now = self._clock()
        dt = (now - self._last_ns) / 1e9
        self._last_ns = now
        s = self.spec
        for g in self._true_mj:
            base = s.idle_w + (s.busy_w if self._busy[g] else 0.0)
            work = self._work_mj[g]
            cap = max(s.board_w - base, 0.0) * dt * 1000
            spent = min(work, cap)
            self._work_mj[g] = work - spent
            self._true_mj[g] += base * dt * 1000 + spent

    def true_mj(self, gpu: str) -> float:
        with self._lock:
            self._advance()
            return self._true_mj[gpu]

    def read(self) -> list[Reading]:
        with self._lock:
            self._advance()
            now, s = self._clock(), self.spec
            out = []
            if self._next_reset_ns is not None and now >= self._next_reset_ns:
                self._origin = dict(self._true_mj)  # a driver reload: the counter restarts
                self._next_reset_ns += int((s.reset_every_s or 0) * 1e9)
            for g, mj in self._true_mj.items():
                value = (mj - self._origin[g]) * s.gain
                if s.step_ms:
                    step_mj = s.board_w * s.step_ms  # never finer than one step's worth
                    value = math.floor(value / step_mj) * step_mj
                out.append(Reading(g, now, int(value)))
            return out

    def board_w(self, gpu: str) -> float | None:
        return self.spec.board_w

    def close(self) -> None:
        pass
