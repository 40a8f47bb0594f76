"""The in-process quota backend: admission on its clocks, settlement of a ticket to the real
usage (tokens, dollars, joules; the concurrency slot released; the usage-ratio gauges set),
reconfiguration that keeps what was spent, and spend persisted across a restart."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meterproxy import config
from meterproxy.errors import QuotaExhausted
from meterproxy.metrics import Metrics
from meterproxy.policy import Tenancy, hash_key
from meterproxy.quota_local import LocalQuota
from meterproxy.usage import Source, Usage

from .factories import settlement

NOW_S = datetime(2026, 3, 14, 12, 0, tzinfo=timezone.utc).timestamp()
DAY = "2026-03-14"
S = 1_000_000_000


def tenancy(path: Path, tokens_per_day: int = 1_000, zone: str = "UTC", **limits: int) -> Tenancy:
    tree = {
        "upstreams": [{"name": "u", "url": "http://127.0.0.1:9/v1"}],
        "tenants": {
            "research": {
                "keys": [f"sha256:{hash_key('k')}"],
                "limits": {"tokens_per_day": tokens_per_day, "max_concurrent": 2, **limits},
            }
        },
        "quota": {"state_path": str(path), "timezone": zone},
    }
    return config.parse(tree, {}).tenancy


class Clocks:
    def __init__(self) -> None:
        self.now_ns = 100 * S
        self.now_s = NOW_S


def backend(path: Path, registry: CollectorRegistry, clocks: Clocks) -> LocalQuota:
    return LocalQuota(tenancy(path), Metrics(registry), lambda: clocks.now_ns, lambda: clocks.now_s)


def ratio(registry: CollectorRegistry, limit: str) -> float | None:
    return registry.get_sample_value(
        "meterproxy_quota_usage_ratio", {"tenant": "research", "limit": limit}
    )


async def test_a_ticket_is_settled_to_the_real_usage(tmp_path: Path) -> None:
    registry, clocks = CollectorRegistry(), Clocks()
    quota = backend(tmp_path / "q.db", registry, clocks)
    tenant = tenancy(tmp_path / "q.db").tenants["research"]
    ticket = await quota.admit(tenant, 400, "mp-1", capped=True)
    assert ticket.reserved == 400 and ticket.day == DAY
    state = quota.quota.state("research")
    assert state.concurrent == 1 and state.reserved_today == 400
    clocks.now_ns += 2 * S
    quota.settle(
        settlement(
            tenant="research",
            ticket=ticket,
            usage=Usage(120, 80, None, None, Source.UPSTREAM),
            cost_usd=0.02,
            energy_j=350.0,
        )
    )
    assert state.concurrent == 0 and state.reserved_today == 0
    assert quota.quota.used("research", "tokens", DAY) == 200
    assert quota.quota.used("research", "usd", "2026-03") == 0.02
    assert quota.quota.used("research", "joules", DAY) == 350.0
    assert ratio(registry, "tokens_per_day") == pytest.approx(0.2)
    assert ratio(registry, "max_concurrent") == 0.0


async def test_the_usage_ratios_are_read_when_scraped(tmp_path: Path) -> None:
    """A ratio is what is used at the scrape, not at the last settlement: a request admitted
    since shows, and a sliding window empties with time; a limit a reload adds gets its gauge."""
    registry, clocks = CollectorRegistry(), Clocks()
    quota = backend(tmp_path / "q.db", registry, clocks)
    tenant = tenancy(tmp_path / "q.db").tenants["research"]
    first = await quota.admit(tenant, 10, "mp-1", capped=True)
    assert ratio(registry, "max_concurrent") is None  # no gauge before a first settlement
    quota.settle(settlement(tenant="research", ticket=first, usage=Usage(5, 5)))
    assert ratio(registry, "max_concurrent") == 0.0
    second = await quota.admit(tenant, 10, "mp-2", capped=True)
    await quota.admit(tenant, 10, "mp-3", capped=True)
    assert ratio(registry, "max_concurrent") == 1.0  # two in flight of two, none settled
    assert ratio(registry, "requests_per_minute") is None  # not a limit of this tenant
    reloaded = tenancy(tmp_path / "q.db", requests_per_minute=10)
    quota.reconfigure(reloaded)
    assert ratio(registry, "requests_per_minute") == 0.0
    quota.settle(settlement(tenant="research", ticket=second, usage=Usage(5, 5)))
    await quota.admit(reloaded.tenants["research"], 10, "mp-4", capped=True)
    assert ratio(registry, "requests_per_minute") == pytest.approx(0.1)
    clocks.now_ns += 61 * S
    assert ratio(registry, "requests_per_minute") == 0.0  # the minute has passed


async def test_a_settlement_without_a_ticket_changes_nothing(tmp_path: Path) -> None:
    registry, clocks = CollectorRegistry(), Clocks()
    quota = backend(tmp_path / "q.db", registry, clocks)
    quota.settle(settlement(tenant="research", ticket=None))
    assert quota.quota.states == {} and quota.quota.dirty == set()
    assert ratio(registry, "tokens_per_day") is None


async def test_an_uncapped_request_is_admitted_while_the_budget_is_not_full(
    tmp_path: Path,
) -> None:
    registry, clocks = CollectorRegistry(), Clocks()
    quota = backend(tmp_path / "q.db", registry, clocks)
    tenant = tenancy(tmp_path / "q.db").tenants["research"]
    with pytest.raises(QuotaExhausted):
        await quota.admit(tenant, 5_000, "mp-1", capped=True)  # cannot fit whole
    ticket = await quota.admit(tenant, 5_000, "mp-2", capped=False)
    with pytest.raises(QuotaExhausted):  # the reservation fills the day's budget
        await quota.admit(tenant, 1, "mp-3", capped=False)
    quota.settle(settlement(tenant="research", ticket=ticket, usage=Usage(10, 10)))
    await quota.admit(tenant, 1, "mp-4", capped=False)


async def test_reconfigure_applies_new_limits_and_keeps_the_spend(tmp_path: Path) -> None:
    registry, clocks = CollectorRegistry(), Clocks()
    quota = backend(tmp_path / "q.db", registry, clocks)
    tenant = tenancy(tmp_path / "q.db").tenants["research"]
    ticket = await quota.admit(tenant, 100, "mp-1", capped=True)
    quota.reconfigure(tenancy(tmp_path / "q.db", tokens_per_day=400, zone="Asia/Tokyo"))
    quota.settle(settlement(tenant="research", ticket=ticket, usage=Usage(60, 40)))
    assert str(quota.quota.zone) == "Asia/Tokyo"
    assert quota.quota.used("research", "tokens", DAY) == 100  # the day it was admitted
    # March 14th 21:00 in Tokyo: the same day, measured against the new limit.
    assert ratio(registry, "tokens_per_day") == pytest.approx(100 / 400)
    new_tenant = tenancy(tmp_path / "q.db", tokens_per_day=400).tenants["research"]
    with pytest.raises(QuotaExhausted):
        await quota.admit(new_tenant, 500, "mp-2", capped=True)


async def test_spend_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clocks = Clocks()
    first = backend(path, CollectorRegistry(), clocks)
    await first.open()
    tenant = tenancy(path).tenants["research"]
    ticket = await first.admit(tenant, 100, "mp-1", capped=True)
    first.settle(settlement(tenant="research", ticket=ticket, usage=Usage(300, 500)))
    await first.close()
    second = backend(path, CollectorRegistry(), clocks)
    await second.open()
    assert second.quota.used("research", "tokens", DAY) == 800
    with pytest.raises(QuotaExhausted, match="used 800 of 1,000 tokens today"):
        await second.admit(tenant, 300, "mp-2", capped=True)
    await second.close()


async def test_a_repeated_settlement_changes_nothing(tmp_path: Path) -> None:
    """QuotaBackend.settle is idempotent per request: a settlement that comes twice (a retry,
    a replay) releases its slot and charges its usage once."""
    quota = backend(tmp_path / "q.db", CollectorRegistry(), Clocks())
    tenant = tenancy(tmp_path / "q.db").tenants["research"]
    ticket = await quota.admit(tenant, 100, "mp-1", capped=True)
    done = settlement(ticket=ticket, tenant=tenant.name, usage=Usage(10, 20, None, None))
    quota.settle(done)
    state = quota.quota.state(tenant.name)
    before = (state.concurrent, state.reserved_today, dict(state.spend))
    quota.settle(done)
    assert (state.concurrent, state.reserved_today, dict(state.spend)) == before
    assert state.concurrent == 0 and state.reserved_today == 0
