"""A second simulated GPU, written apart from the attribution (energy/) and from the twin
(sim/gpu.py) so that it can grade them: physics the attribution's defaults were not drawn from,
and two definitions of each request's true energy.

The engine schedules like vLLM V1: one token budget per step (`chunk_tokens`) shared by every
running sequence; each decoding sequence takes one token of it, the rest goes to prompt chunks,
first come first served (chunked prefill). Prompts that share a prefix find it in a prefix cache
(LRU, in tokens) and skip prefilling it. Physics of one step:

- duration: launch overhead + per decoding sequence + KV-cache reads (grow with context) +
  prefill compute; stretched when the board would exceed its power limit;
- static power: `idle_w` always, plus `floor_w` whenever anything is running (clocks and
  memory up, whatever the batch size);
- shared energy: streaming the weights once per step;
- own energy: per decoded token, plus KV reads per token x context; per prefilled token, plus
  attention growing with the position in the prompt.

Truth by residency: each step's static and shared energy split equally among the sequences
running in it, plus each one's own energy. Truth by work: the step's static and shared energy
split in proportion to the step time each sequence's own work takes (its decode and KV reads,
or its prompt chunk; the fixed overhead shared equally), plus each one's own energy. Energy
with nothing running is idle (nobody's). The board's counter can update on a coarse grid
(NVML: about 100 ms) with its own phase.
"""

from __future__ import annotations

import bisect
import collections
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hardware:
    idle_w: float = 82.0
    floor_w: float = 190.0
    weights_j: float = 1.4  # per step
    token_j: float = 0.05  # per decoded token
    kv_j_per_ktoken: float = 0.06  # per decoded token per 1000 tokens of context
    prefill_j: float = 0.011  # per prefilled token
    prefill_attn_j_per_ktoken: float = 0.0006  # per prefilled token per 1000 tokens before it
    step_s: float = 0.0065
    seq_s: float = 0.00012  # per decoding sequence
    kv_s_per_ktoken: float = 0.00005  # per 1000 tokens of context read in a step
    prefill_s_per_token: float = 0.000022  # about 45k prompt tokens/s
    chunk_tokens: int = 2048  # max_num_batched_tokens
    max_seqs: int = 128
    prefix_cache_tokens: int = 200_000
    board_w: float = 700.0


@dataclass
class Job:
    rid: str
    arrival_s: float
    prompt: int
    output: int
    streamed: bool = True
    prefix: str | None = None  # prompts with the same prefix share its first `prefix_tokens`
    prefix_tokens: int = 0
    # what happened
    cached: int = 0
    prefilled: int = 0
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    end_s: float | None = None
    truth_residency_j: float = 0.0
    truth_work_j: float = 0.0


@dataclass
class BatchGpu:
    hw: Hardware = Hardware()
    update_ms: int = 0  # the counter moves only on this grid (0: continuous)
    update_phase_ms: float = 61.0
    _t: list[float] = field(default_factory=lambda: [0.0])
    _e_j: list[float] = field(default_factory=lambda: [0.0])
    _cache: collections.OrderedDict[str, int] = field(default_factory=collections.OrderedDict)
    _cached_total: int = 0

    def serve(self, jobs: list[Job], until_s: float) -> None:
        hw = self.hw
        queue = collections.deque(sorted(jobs, key=lambda j: j.arrival_s))
        waiting: collections.deque[Job] = collections.deque()
        running: list[Job] = []
        t = 0.0
        while queue or waiting or running:
            while queue and queue[0].arrival_s <= t:
                waiting.append(queue.popleft())
            # A waiting request joins the batch when a step has budget left for its first chunk
            # (vLLM V1: running requests are scheduled first).
            budget = hw.chunk_tokens
            for job in running:
                budget -= (
                    1 if job.prefilled >= job.prompt else min(job.prompt - job.prefilled, budget)
                )
            while waiting and len(running) < hw.max_seqs and budget > 0:
                job = waiting.popleft()
                job.cached = self._lookup(job)
                job.prefilled = job.cached
                running.append(job)
                budget -= min(job.prompt - job.prefilled, budget)
            if not running:
                nxt = queue[0].arrival_s
                self._power(t, nxt, hw.idle_w)
                t = nxt
                continue
            t = self._step(t, running)
            for job in [j for j in running if len(j.token_times_s) >= j.output]:
                job.end_s = t
                running.remove(job)
        if t < until_s:
            self._power(t, until_s, hw.idle_w)

    def _step(self, t: float, running: list[Job]) -> float:
        hw = self.hw
        decoding = [j for j in running if j.prefilled >= j.prompt]
        budget = hw.chunk_tokens - len(decoding)
        chunks: dict[str, int] = {}
        for job in running:
            if job.prefilled < job.prompt and budget > 0:
                chunks[job.rid] = min(job.prompt - job.prefilled, budget)
                budget -= chunks[job.rid]
        context_kt = sum(j.prompt + len(j.token_times_s) for j in decoding) / 1000
        prefill = sum(chunks.values())
        dur = hw.step_s + hw.seq_s * len(decoding) + hw.kv_s_per_ktoken * context_kt
        dur += hw.prefill_s_per_token * prefill
        own: dict[str, float] = {}
        cause: dict[str, float] = {}  # the step time each sequence's own work takes
        for job in running:
            mine = took = 0.0
            if job.prefilled >= job.prompt:
                ctx = job.prompt + len(job.token_times_s)
                mine = hw.token_j + hw.kv_j_per_ktoken * ctx / 1000
                took = hw.seq_s + hw.kv_s_per_ktoken * ctx / 1000
            elif job.rid in chunks:
                n, pos = chunks[job.rid], job.prefilled + chunks[job.rid] / 2
                mine = n * (hw.prefill_j + hw.prefill_attn_j_per_ktoken * pos / 1000)
                took = hw.prefill_s_per_token * n
            own[job.rid] = mine
            cause[job.rid] = took
        work = sum(own.values())
        static_w = hw.idle_w + hw.floor_w
        dur = max(dur, (hw.weights_j + work) / (hw.board_w - static_w))  # power limit
        shared = static_w * dur + hw.weights_j
        total = shared + work
        self._power(t, t + dur, total / dur)
        # Time by cause: the fixed overhead (and any power-limit stretch) shared equally.
        overhead = (dur - sum(cause.values())) / len(running)
        cause = {rid: took + overhead for rid, took in cause.items()}
        t += dur
        for job in running:
            job.truth_residency_j += shared / len(running) + own[job.rid]
            job.truth_work_j += shared * cause[job.rid] / dur + own[job.rid]
            if job.rid in chunks:
                job.prefilled += chunks[job.rid]
                if job.prefilled >= job.prompt:
                    self._store(job)
                    job.first_token_s = t
                    job.token_times_s.append(t)
            elif job.prefilled >= job.prompt:
                job.token_times_s.append(t)
        return t

    def _lookup(self, job: Job) -> int:
        if job.prefix is None or job.prefix not in self._cache:
            return 0
        self._cache.move_to_end(job.prefix)
        return min(self._cache[job.prefix], job.prompt - 1) // 16 * 16  # whole KV blocks

    def _store(self, job: Job) -> None:
        if job.prefix is None or job.prefix in self._cache:
            return
        self._cache[job.prefix] = job.prefix_tokens
        self._cached_total += job.prefix_tokens
        while self._cached_total > self.hw.prefix_cache_tokens:
            _, evicted = self._cache.popitem(last=False)
            self._cached_total -= evicted

    def _power(self, t0: float, t1: float, watts: float) -> None:
        self._t.append(t1)
        self._e_j.append(self._e_j[-1] + watts * (t1 - t0))

    def energy_j(self, t_s: float) -> float:
        """True cumulative energy at t (power is constant within a step)."""
        k = bisect.bisect_right(self._t, t_s)
        if k >= len(self._t):
            return self._e_j[-1]
        t0, t1, e0, e1 = self._t[k - 1], self._t[k], self._e_j[k - 1], self._e_j[k]
        return e0 + (e1 - e0) * (t_s - t0) / (t1 - t0) if t1 > t0 else e1

    def counter_mj(self, t_s: float) -> int:
        """The board's total-energy counter as a driver would return it (mJ, integer)."""
        seen = t_s
        if self.update_ms:
            phase = self.update_phase_ms / 1000
            seen = max(math.floor((t_s - phase) * 1000 / self.update_ms), 0) * self.update_ms
            seen = seen / 1000 + phase if t_s >= phase else 0.0
        return int(self.energy_j(seen) * 1000)

    def idle_j(self, jobs: list[Job], until_s: float) -> float:
        """Energy with nothing running: the part of the total that is nobody's."""
        return self.energy_j(until_s) - sum(j.truth_residency_j for j in jobs)
