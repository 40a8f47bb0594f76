"""The work a request does on one GPU, interval by interval, from what the proxy sees: tokens
streaming by, the first token, the end, and the upstream's usage once it arrives. What cannot be
seen is estimated from what can, on the same GPU (pure, no clock):

- prefill happens first come first served: the engine works through the queue at its prefill
  speed, so an interval holds as much prefill as the queue was busy in it, whatever the prompt
  sizes (attribution.Engine._place). A first token shows that prompt's prefill, and every
  earlier one's, done by then (not where it was done: the prompts that share a step finish
  together at its end), and its time to first token bounds how much it can have been. The
  speed is learned from streamed requests (uncached prompt tokens / time at the head of the
  queue), or faster when the current busy period's first tokens show it;
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
NEVER = 1 << 62  # a time not reached yet


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
    last_first_ns: int = 0  # the latest first token: the prefill queue's head moved on then
    # The current busy period of the prefill queue (never empty since `period_ns`): the prefill
    # of its requests already done, and the speed its first tokens have shown at least.
    period_ns: int = 0
    period_tok: float = 0.0
    period_tok_per_ns: float = 0.0
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
    prefill_left: float  # prefill tokens not yet placed in an interval
    # In the engine since (queueing before that is not billed): when the prefill queue reached it.
    enter_ns: int = NEVER
    prefill_end_ns: int = NEVER  # a streamed request's first token; else when the queue passed it
    prefill_placed: float = 0.0
    prefill_now: float = 0.0  # placed in the interval being closed
    first_ns: int | None = None
    head_ns: int = 0  # when its prefill reached the head of the queue (at its first token)
    end_ns: int | None = None
    completion: int | None = None  # from usage
    generated: float = 0.0  # tokens decoded so far (seen, or inferred when not streamed)
    seen: int = 0  # tokens streamed by so far (placed in an interval or not)
    # (t_ns, `seen` after it) of the tokens not yet placed, in the order they came: in time
    # order (one clock stamps them), so the newest whose time is in an interval says how many
    # the interval holds.
    tokens: list[tuple[int, int]] = field(default_factory=list)
    last_token_ns: int | None = None
    energy_mj: float = 0.0
    gpu_ns: float = 0.0
    last_mj: float = 0.0  # what its latest interval gave it

    def advance(self, ta: int, te: int, step_ns: float) -> tuple[int, float, float, float]:
        """Residency (ns), prefill tokens, decode tokens and decode tokens x context (ktokens)
        inside the interval (ta, te], at the engine's step time `step_ns`."""
        end = self.end_ns
        stop = te if end is None or end > te else end
        start = self.enter_ns if self.enter_ns > ta else ta
        res = stop - start if stop > start else 0
        prefill, self.prefill_now = self.prefill_now, 0.0  # placed by the GPU's queue
        if self.streamed:
            tokens = self.tokens
            if not tokens:
                return res, prefill, 0.0, 0.0
            if tokens[-1][0] <= te:  # the newest is last: all of them are in
                decode = tokens[-1][1] - self.generated
                self.tokens = []
            else:  # some came after te (while the interval was still closing): not yet
                k = len(tokens) - 1
                while k >= 0 and tokens[k][0] > te:
                    k -= 1
                if k < 0:
                    return res, prefill, 0.0, 0.0
                decode = tokens[k][1] - self.generated
                del tokens[: k + 1]
        elif res:
            decode = self._inferred_decode(ta, stop, step_ns)
        else:
            return res, prefill, 0.0, 0.0
        # Each token's context is the prompt and the tokens before it, plus half of itself
        # (a chunk of n tokens: n x (context before + n / 2)); summed over the interval's
        # tokens, whatever the chunks, that is decode x (context before + decode / 2).
        context = decode * (self.prompt + self.generated + decode / 2)
        self.generated += decode
        return res, prefill, decode, context / 1000

    def _inferred_decode(self, ta: int, stop: int, step_ns: float) -> float:
        since = max(ta, self.prefill_end_ns)
        tokens = (stop - since) / step_ns if stop > since else 0.0
        if self.completion is not None:
            left = max(self.completion - self.generated, 0.0)
            if self.end_ns is not None and self.end_ns <= stop:
                return left  # the upstream's count is the truth
            return min(tokens, left)
        return tokens
