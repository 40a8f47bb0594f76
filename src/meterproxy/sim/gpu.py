"""A GPU twin: a continuous-batching inference engine on one simulated GPU that knows the true
energy of every request, in virtual time.

Roofline model of one decode step with a batch of b requests (an 8B-class model on a modern
GPU): the step takes `step_s + per_seq_s * b`; during it the board draws `idle_w` (static),
plus `weights_w` (streaming the weights once per step, shared by the batch), plus
`token_mj` per token generated. A request joining the batch is prefilled in its first step, at
`prefill_mj` per prompt token and `prefill_s` per prompt token of extra step time.

Truth per request = its share of static and weight power over the steps it was resident
(equal shares within a step) + its own token and prefill energy; or, by work, static and
weight power in proportion to the part of each step's time its own work took. The twin also
exposes the board's cumulative energy counter, with the real counter's artifacts as options.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuModel:
    idle_w: float = 70.0
    weights_w: float = 280.0
    token_mj: float = 60.0
    prefill_mj: float = 25.0
    step_s: float = 0.018
    per_seq_s: float = 0.0004
    prefill_s: float = 0.00002
    max_batch: int = 64
    prefill_budget: int = 2048  # prompt tokens per step (vLLM's max_num_batched_tokens)
    board_w: float = 700.0


@dataclass
class TwinRequest:
    rid: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    end_s: float | None = None
    true_mj: float = 0.0  # static and weight power by residency, plus its own work
    true_work_mj: float = 0.0  # the whole step's energy in proportion to its own work
    prefilled: int = 0


@dataclass
class Twin:
    model: GpuModel = GpuModel()
    # counter artifacts
    gain: float = 1.0  # the sensor's gain error (1.05 = reads 5 % high)
    step_ms: int = 0  # the counter only moves on this grid (NVML: about 100 ms)
    step_phase_ms: int = 37  # ...whose phase has nothing to do with the sampler's
    reset_at_s: float | None = None  # the counter restarts from 0 here (driver reload)
    # (t_s, cumulative true mJ) at every step boundary; power is constant within a step
    _energy_t: list[float] = field(default_factory=lambda: [0.0])
    _energy_mj: list[float] = field(default_factory=lambda: [0.0])

    def run(self, requests: list[TwinRequest], until_s: float) -> None:
        """Serve the requests (sorted by arrival) and idle until `until_s`."""
        m = self.model
        waiting = sorted(requests, key=lambda r: r.arrival_s)
        running: list[TwinRequest] = []
        t = 0.0
        i = 0
        while True:
            while i < len(waiting) and waiting[i].arrival_s <= t and len(running) < m.max_batch:
                running.append(waiting[i])
                i += 1
            if not running:
                if i >= len(waiting):
                    if t < until_s:
                        self._advance(t, until_s, m.idle_w)
                    return
                nxt = waiting[i].arrival_s
                self._advance(t, nxt, m.idle_w)
                t = nxt
                continue
            # Chunked prefill, as vLLM schedules it: at most `prefill_budget` prompt tokens a
            # step, beside one decode token for every request already prefilled.
            budget = m.prefill_budget
            chunks: dict[str, int] = {}
            for r in running:
                if r.prefilled < r.prompt_tokens and budget > 0:
                    chunks[r.rid] = min(r.prompt_tokens - r.prefilled, budget)
                    budget -= chunks[r.rid]
            decoding = [r for r in running if r.prefilled >= r.prompt_tokens]
            b = len(running)
            dur = m.step_s + m.per_seq_s * len(decoding) + m.prefill_s * sum(chunks.values())
            emits = {r.rid for r in decoding} | {
                r.rid
                for r in running
                if r.rid in chunks and r.prefilled + chunks[r.rid] >= r.prompt_tokens
            }
            own = {
                r.rid: (m.token_mj if r.rid in emits else 0.0) + m.prefill_mj * chunks.get(r.rid, 0)
                for r in running
            }
            # A board at its power limit slows down rather than drawing more.
            work_mj = sum(own.values())
            dur = max(dur, work_mj / 1000 / (m.board_w - m.idle_w - m.weights_w))
            shared_mj = (m.idle_w + m.weights_w) * dur * 1000  # W x s = J -> mJ
            self._advance(t, t + dur, (shared_mj + work_mj) / dur / 1000)
            t += dur
            # By work: the step's time is caused by each sequence's own part of it (decode or
            # prompt chunk); the fixed overhead (and any power-limit stretch) is shared equally.
            cause = {
                r.rid: (m.per_seq_s if r.prefilled >= r.prompt_tokens else 0.0)
                + m.prefill_s * chunks.get(r.rid, 0)
                for r in running
            }
            overhead = (dur - sum(cause.values())) / b
            for r in running:
                r.true_mj += shared_mj / b + own[r.rid]
                r.true_work_mj += shared_mj * (cause[r.rid] + overhead) / dur + own[r.rid]
                r.prefilled += chunks.get(r.rid, 0)
                if r.rid in emits:
                    if r.first_token_s is None:
                        r.first_token_s = t
                    r.token_times_s.append(t)
            done = [r for r in running if len(r.token_times_s) >= r.output_tokens]
            for r in done:
                r.end_s = t
                running.remove(r)

    def _advance(self, t0: float, t1: float, watts: float) -> None:
        self._energy_t.append(t1)
        self._energy_mj.append(self._energy_mj[-1] + watts * (t1 - t0) * 1000)

    def true_energy_mj(self, t_s: float) -> float:
        """The board's true cumulative energy at t (linear within a step)."""
        k = bisect.bisect_right(self._energy_t, t_s)
        if k >= len(self._energy_t):
            return self._energy_mj[-1]
        t0, t1 = self._energy_t[k - 1], self._energy_t[k]
        e0, e1 = self._energy_mj[k - 1], self._energy_mj[k]
        return e0 + (e1 - e0) * (t_s - t0) / (t1 - t0) if t1 > t0 else e1

    def counter_mj(self, t_s: float) -> int:
        """What nvmlDeviceGetTotalEnergyConsumption would return at t (mJ, int)."""
        seen = t_s
        if self.step_ms:
            phase = self.step_phase_ms / 1000
            steps = math.floor((t_s - phase) * 1000 / self.step_ms)
            seen = max(steps * self.step_ms / 1000 + phase, 0.0)
        value = self.true_energy_mj(seen) * self.gain
        if self.reset_at_s is not None and seen >= self.reset_at_s:
            value -= self.true_energy_mj(self.reset_at_s) * self.gain
        return int(value)
