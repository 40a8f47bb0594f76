"""The in-process quota backend: one process's exact sliding windows and calendar budgets
(`quota.Quota`), with day and month spend persisted to SQLite (`quota_store`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from .policy import Tenancy, Tenant
from .quota import RATIO_LIMITS, Quota, Ticket
from .quota_store import QuotaStore

if TYPE_CHECKING:
    from .metrics import Metrics
    from .settlement import Settlement


class LocalQuota:
    def __init__(
        self,
        tenancy: Tenancy,
        metrics: Metrics,
        clock: Callable[[], int],
        wall_clock: Callable[[], float],
    ) -> None:
        self.quota = Quota(tenancy.timezone)
        self._tenancy = tenancy
        self._store = QuotaStore(tenancy.state_path, self.quota)
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._gauged: set[str] = set()  # tenants whose usage-ratio gauges exist
        self._tracked: set[tuple[str, str]] = set()  # (tenant, limit) read when scraped

    def reconfigure(self, tenancy: Tenancy) -> None:
        """A reload: new tenants and limits, maybe a new time zone; spend is kept."""
        self._tenancy = tenancy
        self.quota.set_timezone(tenancy.timezone)
        for name in self._gauged:  # limits added to a tenant already gauged
            self._gauge(name)

    def clock(self) -> int:
        return self._clock()

    async def admit(self, tenant: Tenant, estimate: int, key: str, *, capped: bool) -> Ticket:
        return self.quota.admit(tenant, estimate, self._clock(), self._wall_clock(), capped=capped)

    def settle(self, settlement: Settlement) -> None:
        ticket = settlement.ticket
        if ticket is None:
            return
        usage = settlement.usage
        tokens = (usage.prompt or 0) + (usage.completion or 0)
        self.settle_amounts(ticket, tokens, settlement.cost_usd, settlement.energy_j or 0.0)

    def settle_amounts(self, ticket: Ticket, tokens: int, usd: float, joules: float) -> None:
        self.quota.settle(ticket, tokens, usd, joules, self._clock(), self._wall_clock())
        if ticket.tenant not in self._gauged:
            self._gauged.add(ticket.tenant)
            self._gauge(ticket.tenant)

    def _gauge(self, name: str) -> None:
        """The tenant's usage-ratio gauges, one per limit it has, read when scraped (so the
        sliding windows show their current state; computing all six at each settlement cost
        ~10 us a request)."""
        tenant = self._tenancy.tenant(name)
        for limit in RATIO_LIMITS:
            if getattr(tenant.limits, limit) and (name, limit) not in self._tracked:
                self._tracked.add((name, limit))
                self._metrics.track(
                    self._metrics.quota_usage_ratio.labels(name, limit),
                    functools.partial(self._ratio, name, limit),
                )

    def _ratio(self, name: str, limit: str) -> float:
        """Used / limit now (0 once the tenant or the limit is gone from the configuration)."""
        tenant = self._tenancy.tenant(name)
        return self.quota.ratios(tenant, self._clock(), self._wall_clock()).get(limit, 0.0)

    async def open(self) -> None:
        await self._store.open(self._wall_clock())

    async def run(self) -> None:
        await self._store.run()

    async def close(self) -> None:
        await self._store.close()
