"""The seams where the next backend plugs in: quota state and GPU energy.

The request path talks only to these protocols. Quota: the in-process store (`quota_local`)
and Redis are implementations of `QuotaBackend`; energy: the NVML/DCGM/simulated tracker and
`NoEnergy` of `EnergyBackend`. One worker or several is a choice of implementation, never a
branch in the request path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .policy import Tenancy, Tenant
    from .quota import Ticket
    from .settlement import Settlement
    from .usage import Usage

Group = tuple[str, str, str]  # (model, upstream, tenant): what live energy counters are keyed by
# Called once, on the loop, when a request's energy is final: (joules or None when unknown,
# GPU-seconds or None when no GPU followed it).
EnergyDone = Callable[[float | None, float | None], None]


class QuotaBackend(Protocol):
    async def admit(self, tenant: Tenant, estimate: int, key: str, *, capped: bool) -> Ticket:
        """Reserve one request and `estimate` tokens for request `key`, or raise RateLimited,
        QuotaExhausted or QuotaUnavailable. `capped`: the request set an output cap, so the
        whole estimate must fit; else it is admitted while the window or budget is not full.
        Never called for a tenant without limits."""

    def settle(self, settlement: Settlement) -> None:
        """Replace the reservation by the actual usage (a settlement sink): never blocks,
        idempotent per request key."""

    def reconfigure(self, tenancy: Tenancy) -> None:
        """A reload: new tenants and limits; what was spent is kept."""

    async def open(self) -> None: ...

    async def run(self) -> None:
        """The backend's background work (persisting, draining a queue); runs until cancelled."""

    async def close(self) -> None: ...


class EnergyBackend(Protocol):
    """Request events in, joules out; keyed by the proxy's request key."""

    def start(
        self, key: str, upstream: str, group: Group, prompt_tokens: int, streamed: bool
    ) -> None:
        """The request reaches its upstream; `prompt_tokens` is an estimate of its prompt."""

    def first_token(self, key: str, prompt_tokens: int, t_ns: int) -> None: ...

    def decoded(self, key: str, tokens: int) -> None: ...

    def usage(self, key: str, usage: Usage) -> None:
        """The upstream's own usage, once known: corrects the request's work."""

    def end(self, key: str) -> None: ...

    def defer(self, key: str, done: EnergyDone) -> bool:
        """True when `done` will be called once the request's energy is final; False when no
        GPU follows this request (`done` is never called)."""


class NoEnergy:
    """No energy source: every event is ignored and nothing waits."""

    def start(
        self, key: str, upstream: str, group: Group, prompt_tokens: int, streamed: bool
    ) -> None:
        pass

    def first_token(self, key: str, prompt_tokens: int, t_ns: int) -> None:
        pass

    def decoded(self, key: str, tokens: int) -> None:
        pass

    def usage(self, key: str, usage: Usage) -> None:
        pass

    def end(self, key: str) -> None:
        pass

    def defer(self, key: str, done: EnergyDone) -> bool:
        return False
