"""The seams where the next backend plugs in: quota state and GPU energy.

The request path talks only to these protocols. Quota: the in-process store (`quota_local`)
and Redis are implementations of `QuotaBackend`; energy: the NVML/DCGM/simulated tracker and
`NoEnergy` of `EnergyBackend` (whose protocol lives with the energy code). One worker or
several is a choice of implementation, never a branch in the request path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .energy.backend import Done, EnergyBackend, Group

if TYPE_CHECKING:
    from .policy import Tenancy, Tenant
    from .quota import Ticket
    from .settlement import Settlement

__all__ = ["EnergyBackend", "NoEnergy", "QuotaBackend"]


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


class NoEnergy:
    """No energy source: every event is ignored and nothing waits."""

    def start(
        self, key: str, upstream: str, group: Group, prompt_tokens: int, streamed: bool
    ) -> None:
        pass

    def first_token(self, key: str, t_ns: int) -> None:
        pass

    def decoded(self, key: str, tokens: int) -> None:
        pass

    def usage(
        self, key: str, prompt: int | None, cached_prompt: int | None, completion: int | None
    ) -> None:
        pass

    def end(self, key: str) -> None:
        pass

    def defer(self, key: str, done: Done) -> bool:
        return False
