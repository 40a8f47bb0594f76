"""The work a request does on one GPU, interval by interval, from what the proxy sees: tokens
streaming by, the first token, the end, and the upstream's usage once it arrives. What cannot be
seen is estimated from what can, on the same GPU (pure, no clock):

- prefill happens first come first served at the GPU's prefill speed, learned from streamed
  requests (uncached prompt tokens / time to first token); a streamed request's prefill never
  ends before its first token, and its time to first token bounds how much it can be;
- a non-streamed request decodes one token per engine step, like every sequence in a
  continuous batch; the step time is learned from the token gaps of streamed requests;
- cached prompt tokens are not prefill work; each group's cached share of its prompts, and how
  its prompt-size estimate compares with the upstream's count, are learned from usage.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from dataclasses import dataclass, field

Group = Hashable  # what live metrics are keyed by: (model, upstream, tenant)


class Habits:
    """Per group: upstream prompt tokens / our estimate, and the cached share of prompts."""

    __slots__ = ("cached_share", "prompt_ratio")

    def __init__(self) -> None:
        self.prompt_ratio = 1.0
        self.cached_share = 0.0

    def learn(self, estimate: float, prompt: int | None, cached: int | None) -> None:
        if prompt and estimate > 0:
            self.prompt_ratio += 0.1 * (min(prompt / estimate, 10.0) - self.prompt_ratio)
        if prompt and cached is not None:
            self.cached_share += 0.1 * (min(cached / prompt, 1.0) - self.cached_share)


@dataclass
class Pace:
    """One GPU's engine: step time and prefill speed, learned; the prefill queue."""

    step_ns: float
    prefill_tok_per_ns: float
    interval_ns: int = 100_000_000
    prefill_free_ns: int = 0  # estimated end of the prefills already queued
    last_first_ns: int = 0  # the latest first token: the prefill queue's head moved on then
    streamed_steps: int = 0  # step samples seen from streams (they beat non-streamed ones)
    _speeds: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=32))

    def step_sample(self, gap_ns: float, *, streamed: bool) -> None:
        if gap_ns <= 0 or gap_ns > 2e9 or (not streamed and self.streamed_steps > 20):
            return
        if streamed:
            self.streamed_steps += 1
        gap_ns = min(max(gap_ns, 0.25 * self.step_ns), 4.0 * self.step_ns)
        self.step_ns += 0.05 * (gap_ns - self.step_ns)

    def speed_sample(self, tokens: int, ttft_ns: int) -> None:
        if tokens >= 256 and ttft_ns > 1_000_000:
            self._speeds.append(tokens / ttft_ns)
            ordered = sorted(self._speeds)
            self.prefill_tok_per_ns = ordered[len(ordered) // 2]


@dataclass(slots=True)
class Share:
    """One request on one GPU. Times in ns, token counts as floats (prefill is spread)."""

    group: Group
    streamed: bool
    started_ns: int
    estimate: float  # prompt tokens as estimated at the start (bytes / 4)
    prompt: float  # best known prompt size: estimate x the group's ratio, then usage
    enter_ns: int  # in the engine since (queueing before that is not billed)
    prefill_begin_ns: int
    prefill_end_ns: int  # estimated; a streamed request's prefill ends at its first token
    prefill_left: float  # prefill tokens not yet placed in an interval
    prefill_placed: float = 0.0
    first_ns: int | None = None
    head_ns: int = 0  # when its prefill reached the head of the queue (at its first token)
    end_ns: int | None = None
    completion: int | None = None  # from usage
    generated: float = 0.0  # tokens decoded so far (seen, or inferred when not streamed)
    tokens: list[tuple[int, int]] = field(default_factory=list)  # (t_ns, n) not yet placed
    last_token_ns: int | None = None
    energy_mj: float = 0.0
    gpu_ns: float = 0.0
    last_mj: float = 0.0  # what its latest interval gave it

    def advance(self, ta: int, te: int, pace: Pace) -> tuple[int, float, float, float]:
        """Residency (ns), prefill tokens, decode tokens and decode tokens x context (ktokens)
        inside the interval (ta, te]."""
        end = self.end_ns
        stop = te if end is None or end > te else end
        start = self.enter_ns if self.enter_ns > ta else ta
        res = stop - start if stop > start else 0
        prefill = self._prefill(ta, te, pace) if self.prefill_left > 0.0 else 0.0
        decode = context = 0.0
        if self.streamed:
            if self.tokens:
                kept = []
                for t_ns, n in self.tokens:
                    if t_ns <= te:
                        decode += n
                        context += n * (self.prompt + self.generated + n / 2)
                        self.generated += n
                    else:
                        kept.append((t_ns, n))
                self.tokens = kept
        elif res:
            decode = self._inferred_decode(ta, stop, pace)
            context = decode * (self.prompt + self.generated + decode / 2)
            self.generated += decode
        return res, prefill, decode, context / 1000

    def _prefill(self, ta: int, te: int, pace: Pace) -> float:
        begin = self.prefill_begin_ns
        if te <= begin:
            return 0.0
        done = (self.first_ns is not None and self.first_ns <= te) or (
            self.end_ns is not None and self.end_ns <= te
        )
        if done:
            part = self.prefill_left
        else:
            end = self.prefill_end_ns
            if self.streamed:  # not before its first token: keep some for the interval it is in
                end = max(end, te + pace.interval_ns)
            since = max(ta, begin)
            part = self.prefill_left * min(1.0, (te - since) / max(end - since, 1))
        self.prefill_left -= part
        self.prefill_placed += part
        return part

    def _inferred_decode(self, ta: int, stop: int, pace: Pace) -> float:
        since = max(ta, self.prefill_end_ns)
        tokens = (stop - since) / pace.step_ns if stop > since else 0.0
        if self.completion is not None:
            left = max(self.completion - self.generated, 0.0)
            if self.end_ns is not None and self.end_ns <= stop:
                return left  # the upstream's count is the truth
            return min(tokens, left)
        return tokens
