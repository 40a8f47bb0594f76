"""The in-process quota backend: one process's exact sliding windows and calendar budgets
(`quota.Quota`), with day and month spend persisted to SQLite (`quota_store`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .policy import Tenancy, Tenant
from .quota import Quota, Ticket
from .quota_store import QuotaStore

if TYPE_CHECKING:
    from prometheus_client import Gauge

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
        self._gauges: dict[tuple[str, str], Gauge] = {}  # (tenant, limit) -> its child

    def reconfigure(self, tenancy: Tenancy) -> None:
        """A reload: new tenants and limits, maybe a new time zone; spend is kept."""
        self._tenancy = tenancy
        self.quota.set_timezone(tenancy.timezone)

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
        now_ns, now_s = self._clock(), self._wall_clock()
        self.quota.settle(ticket, tokens, usd, joules, now_ns, now_s)
        tenant = self._tenancy.tenant(ticket.tenant)
        gauges = self._gauges
        for limit, ratio in self.quota.ratios(tenant, now_ns, now_s).items():
            gauge = gauges.get((tenant.name, limit))
            if gauge is None:  # labels() costs microseconds: resolved once per label set
                gauge = gauges[tenant.name, limit] = self._metrics.quota_usage_ratio.labels(
                    tenant.name, limit
                )
            gauge.set(ratio)

    async def open(self) -> None:
        await self._store.open(self._wall_clock())

    async def run(self) -> None:
        await self._store.run()

    async def close(self) -> None:
        await self._store.close()
