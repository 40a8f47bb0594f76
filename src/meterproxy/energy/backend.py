"""The seam between the request path and energy metering. The request path reports what it sees
of each request, keyed by the proxy's request key; the backend answers, once, with the
request's energy when it is final. The in-process tracker (tracker.py) is one implementation;
one sampler per host serving several workers would be another.

    start -> first_token? -> decoded* -> usage? -> end -> defer(done)

`done(energy_j, gpu_seconds)` is called exactly once, on the event loop: `energy_j` is None when
the energy is unknown (the source failed or stalled), never a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Group = tuple[str, str, str]  # (model, upstream, tenant): what live metrics are keyed by
Done = Callable[[float | None, float], None]


class EnergyBackend(Protocol):
    def start(
        self, key: str, upstream: str, group: Group, prompt_tokens: int, streamed: bool
    ) -> None:
        """The request is sent upstream; `prompt_tokens` is an estimate (body bytes / 4)."""
        ...

    def first_token(self, key: str, t_ns: int) -> None:
        """A streamed response's first content token arrived at `t_ns` (monotonic)."""
        ...

    def decoded(self, key: str, tokens: int) -> None:
        """More tokens streamed by (not called for non-streamed responses)."""
        ...

    def usage(
        self, key: str, prompt: int | None, cached_prompt: int | None, completion: int | None
    ) -> None:
        """The upstream's own counts, as soon as they are known (before `end`, or just after):
        they correct the request's work before its energy is final."""
        ...

    def end(self, key: str) -> None:
        """The upstream exchange is over (completed, failed or cancelled)."""
        ...

    def defer(self, key: str, done: Done) -> bool:
        """Call `done` once the request's energy is final; False if this backend does not
        meter the request (no GPUs behind its upstream): then `done` is never called."""
        ...
