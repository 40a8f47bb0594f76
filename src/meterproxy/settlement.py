"""Settlement: each exchange settles exactly once into a frozen `Settlement` that fans out to
every sink.

`Settler.settle` runs in the request's single `finally`, synchronously (no `await`, so
cancellation cannot split it). Completers may hold a settlement back until what it still lacks
is known: its energy (once its GPUs have sampled past its end) and a token estimate (counted in
a worker thread, never on the loop). Then the cost is priced and every sink receives it, once.
Sinks never block: metrics observe at once; the ledger and remote quota backends queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .exchange import Exchange, Outcome
from .pricing import Cost
from .usage import Source, Usage

if TYPE_CHECKING:
    from .quota import Ticket

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # monotonic nanoseconds


class Settlement(NamedTuple):
    """What one request did, final. A named tuple rather than a frozen dataclass: it is made
    once per request, and a frozen dataclass sets each of its 27 fields through
    `object.__setattr__` (5.6 us a request; this is 1)."""

    request_id: str  # the proxy's own request key
    endpoint: str
    tenant: str
    model: str
    upstream: str
    status: str
    outcome: Outcome
    usage: Usage
    estimated: bool
    streamed: bool
    started_ns: int
    first_token_ns: int | None
    ended_ns: int
    ts: float  # end of the request, Unix seconds
    reached_upstream: bool
    waste_reason: str | None
    upstream_error: str | None
    client_request_id: str | None
    upstream_request_id: str | None
    client_user: str | None
    gpu_seconds: float
    energy_j: float | None
    cost_usd: float
    priced: bool
    ticket: Ticket | None
    task_id: str | None = None  # the client's x-meterproxy-task (None: its own task)
    duplicate: bool = False  # a repeat of a recent identical request from the same tenant

    @property
    def duration_ns(self) -> int:
        return self.ended_ns - self.started_ns

    @property
    def ttft_ns(self) -> int | None:
        return None if self.first_token_ns is None else self.first_token_ns - self.started_ns

    @property
    def tpot_ns(self) -> int | None:
        completion = self.usage.completion
        if not self.streamed or self.first_token_ns is None or not completion or completion < 2:
            return None
        return (self.ended_ns - self.first_token_ns) // (completion - 1)


Sink = Callable[[Settlement], None]
# Told once an exchange's tenant is known, before it settles (e.g. to know a task is in flight).
Opener = Callable[[Exchange], None]
# A completer returns True when it will call `done()` later (on the loop, exactly once).
Completer = Callable[[Exchange, Callable[[], None]], bool]
Pricer = Callable[[Exchange], Cost]


class Settler:
    def __init__(
        self,
        clock: Clock,
        wall_clock: Callable[[], float],
        *,
        price: Pricer,
        on_error: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._price = price
        self._on_error = on_error
        self._sinks: tuple[Sink, ...] = ()
        self._completers: tuple[Completer, ...] = ()
        self._openers: tuple[Opener, ...] = ()
        self.pending = 0  # settlements waiting for a completer
        self._idle: asyncio.Event | None = None

    def add_sinks(self, sinks: Sequence[Sink]) -> None:
        """Composition time only: the sinks every settlement fans out to, in order."""
        self._sinks = (*self._sinks, *sinks)

    def add_completer(self, completer: Completer) -> None:
        self._completers = (*self._completers, completer)

    def add_opener(self, opener: Opener) -> None:
        """Composition time only: told of every exchange once its tenant is known."""
        self._openers = (*self._openers, opener)

    def opened(self, ex: Exchange) -> None:
        """The exchange's tenant is known; it will settle later. Synchronous, guarded."""
        for opener in self._openers:
            try:
                opener(ex)
            except Exception:  # same guard as the sinks: a metering bug must not fail a request
                self._on_error()
                log.exception("settlement opener %r failed for request %s", opener, ex.key)

    def settle(self, ex: Exchange) -> None:
        """Exactly once per exchange, synchronously."""
        if ex.settled:
            raise RuntimeError(f"request {ex.key} settled twice")
        ex.settled = True
        ex.ended_ns = self._clock()
        waiting = [1]  # held by settle itself until every completer has been asked

        def done() -> None:
            waiting[0] -= 1
            if waiting[0] == 0:
                self.pending -= 1
                self._fan_out(ex)
                if not self.pending and self._idle is not None:
                    self._idle.set()

        self.pending += 1
        for completer in self._completers:
            waiting[0] += 1  # before asking: a completer may call `done` before it returns
            try:
                will_call = completer(ex, done)
            except Exception:  # a completer bug must not lose the settlement
                self._on_error()
                log.exception("settlement completer failed for request %s", ex.key)
                will_call = False
            if not will_call:
                waiting[0] -= 1
        done()

    async def wait_idle(self, timeout_s: float) -> bool:
        """At shutdown: until no settlement waits for a completer (or the timeout)."""
        if not self.pending:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _fan_out(self, ex: Exchange) -> None:
        try:
            cost = self._price(ex) if ex.reached_upstream else Cost(0.0, True)
        except Exception:  # same guard as the sinks: count, log, still settle
            self._on_error()
            log.exception("pricing request %s failed", ex.key)
            cost = Cost(0.0, False)
        settlement = freeze(ex, self._wall_clock(), cost)
        for sink in self._sinks:
            try:
                sink(settlement)
            except Exception:  # the one broad guard: a metering bug must not fail a request
                self._on_error()
                log.exception("settlement sink %r failed for request %s", sink, ex.key)


def freeze(ex: Exchange, ts: float, cost: Cost) -> Settlement:
    # Positional, in the fields' order (a call with 27 keywords costs ~0.8 us more a request);
    # `test_freeze_carries_every_field` gives each field a distinct value and checks it.
    return Settlement(
        ex.key,  # request_id
        ex.endpoint.name,
        ex.tenant.name,
        ex.model,
        ex.upstream,
        ex.status,
        ex.outcome,
        ex.usage,
        ex.estimated,
        ex.stream,  # streamed
        ex.started_ns,
        ex.first_token_ns,
        ex.ended_ns,
        ts,
        ex.reached_upstream,
        ex.waste.value if ex.waste is not None else None,  # waste_reason
        ex.upstream_error,
        ex.client_request_id,
        ex.upstream_request_id,
        ex.client_user,
        ex.gpu_seconds,
        ex.energy_j,
        cost.usd,  # cost_usd
        cost.priced,
        ex.ticket,
        ex.task_id,
        ex.duplicate,
    )


class EstimateCompleter:
    """Counts the tokens of an exchange whose upstream reported no usage: in a worker thread
    when the text is large, so a 32 MiB prompt cut off by a client never stalls the loop."""

    def __init__(
        self,
        count_prompt: Callable[[Exchange], int],
        count_text: Callable[[Exchange, str], int],
        spawn: Callable[[str, Coroutine[Any, Any, None]], object],
        threshold_chars: int,
        ready: Callable[[Exchange], bool] = lambda ex: True,
    ) -> None:
        """`ready`: whether the exchange's encoding is loaded (if not, the count runs in a
        worker thread whatever its size: loading takes a fifth of a second)."""
        self._count_prompt = count_prompt
        self._count_text = count_text
        self._spawn = spawn
        self._threshold = threshold_chars
        self._ready = ready

    def __call__(self, ex: Exchange, done: Callable[[], None]) -> bool:
        if ex.pending_text is None:
            return False
        text, ex.pending_text = ex.pending_text, None
        source = Source.PARTIAL if ex.outcome is not Outcome.SUCCESS else Source.ESTIMATE
        size = len(text) + ex.body_bytes
        if size < self._threshold and self._ready(ex):
            self._apply(ex, text, source)
            return False
        self._spawn(f"estimate:{ex.key}", self._off_loop(ex, text, source, done))
        return True

    async def _off_loop(
        self, ex: Exchange, text: str, source: Source, done: Callable[[], None]
    ) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._apply, ex, text, source)
        finally:
            done()

    def _apply(self, ex: Exchange, text: str, source: Source) -> None:
        try:
            prompt = self._count_prompt(ex)
            completion = self._count_text(ex, text) if ex.endpoint.generates else None
        except Exception:  # never let counting lose a settlement
            log.exception("token estimate failed for request %s", ex.key)
            return
        ex.account(Usage(prompt=prompt, completion=completion, source=source), estimated=True)
