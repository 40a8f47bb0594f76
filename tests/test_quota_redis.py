"""The Redis quota backend against a real redis-server: exact windows across replicas, refusals
identical to the in-process backend's, idempotent settlement with overage, reservations of a
dead replica expiring, both failure modes and recovery, budgets rebuilt from the ledger after a
flush, and the drift between Redis and the ledger."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meterproxy.errors import QuotaExhausted, QuotaUnavailable, RateLimited
from meterproxy.ledger import LEDGER_SCHEMA, Ledger
from meterproxy.ledger_spend import SqliteSpend
from meterproxy.metrics import Metrics
from meterproxy.policy import Limits, Tenancy, Tenant
from meterproxy.quota import Quota, Ticket
from meterproxy.quota_redis import RedisQuota
from meterproxy.quota_settings import QuotaBackendSettings
from meterproxy.store.base import open_store
from meterproxy.usage import Source, Usage

from .factories import settlement
from .redis_support import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture


class Replica:
    """One replica's backend, opened, with its background work running."""

    def __init__(self, backend: RedisQuota, registry: CollectorRegistry) -> None:
        self.backend, self.registry = backend, registry
        self.task: asyncio.Task[None] | None = None

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def settle(self, ticket: Ticket, key: str, tokens: int, **fields: Any) -> None:
        self.backend.settle(
            settlement(
                request_id=key,
                tenant=ticket.tenant,
                ticket=ticket,
                usage=Usage(tokens, 0, None, None, Source.UPSTREAM),
                **fields,
            )
        )
        for _ in range(200):
            if not self.backend.unapplied:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("settlement not applied")


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Any]:
    made: list[Replica] = []

    async def make(
        *tenants: Tenant, ledger: SqliteSpend | None = None, run: bool = True, **settings: Any
    ) -> Replica:
        registry = CollectorRegistry()
        backend = RedisQuota(
            QuotaBackendSettings(
                backend="redis", redis_url=redis_server.url, **{"timeout_s": 0.5, **settings}
            ),
            Tenancy(tenants={t.name: t for t in tenants}),
            Metrics(registry),
            ledger,
            time.time,
        )
        await backend.open()
        replica = Replica(backend, registry)
        if run:
            replica.task = asyncio.create_task(backend.run())
        made.append(replica)
        return replica

    yield make
    for replica in made:
        if replica.task is not None:
            replica.task.cancel()
            await asyncio.gather(replica.task, return_exceptions=True)
        await replica.backend.close()


def research(**limits: Any) -> Tenant:
    return Tenant("research", limits=Limits(**limits))


async def test_requests_per_minute_is_exact_across_three_replicas(replicas: Any) -> None:
    tenant = research(requests_per_minute=10)
    three = [await replicas(tenant) for _ in range(3)]

    async def one(i: int) -> str:
        try:
            await three[i % 3].backend.admit(tenant, 0, f"k{i}", capped=True)
            return "ok"
        except RateLimited as refused:
            return refused.message

    results = await asyncio.gather(*(one(i) for i in range(60)))
    assert results.count("ok") == 10
    refusal = next(r for r in results if r != "ok")
    assert re.fullmatch(
        r"tenant `research` has made 10 of 10 requests in the last minute; retry in 59\.\d+s",
        refusal,
    ), refusal


async def test_refusals_read_exactly_like_the_in_process_backend(replicas: Any) -> None:
    """Same sequence through quota.Quota and through Redis: same messages and headers."""
    tenant = research(requests_per_minute=2, tokens_per_minute=1000, tokens_per_day=100)
    local, remote = Quota("UTC"), (await replicas(tenant)).backend
    t0 = time.monotonic_ns()

    def local_admit(estimate: int, *, capped: bool = True) -> Ticket:
        return local.admit(tenant, estimate, time.monotonic_ns() - t0, time.time(), capped=capped)

    # A budget: 150 tokens used of 100 (overage charged, the balance below zero).
    ticket = local_admit(60)
    local.settle(ticket, 150, 0.0, 0.0, time.monotonic_ns() - t0, time.time())
    rticket = await remote.admit(tenant, 60, "a", capped=True)
    assert (rticket.reserved, rticket.day) == (ticket.reserved, ticket.day)
    replica = Replica(remote, CollectorRegistry())
    await replica.settle(rticket, "a", 150)
    with pytest.raises(QuotaExhausted) as here:
        local_admit(10)
    with pytest.raises(QuotaExhausted) as there:
        await remote.admit(tenant, 10, "b", capped=True)
    assert there.value.message == here.value.message
    assert "has used 150 of 100 tokens today; resets at" in there.value.message
    assert (
        abs(int(there.value.headers["retry-after"]) - int(here.value.headers["retry-after"])) <= 1
    )
    assert (there.value.type, there.value.code, there.value.limit) == (
        "insufficient_quota",
        "insufficient_quota",
        "tokens_per_day",
    )

    # A window: two requests admitted, the third refused with x-ratelimit-*.
    tenant = research(requests_per_minute=2, tokens_per_minute=1000)
    local_admit(100)  # the second request of the minute (the first was the budget's)
    await remote.admit(tenant, 100, "w1", capped=True)
    with pytest.raises(RateLimited) as here:
        local_admit(100)
    with pytest.raises(RateLimited) as there:
        await remote.admit(tenant, 100, "w2", capped=True)

    def shape(text: str) -> str:
        return re.sub(r"(\d+m)?\d+(\.\d+)?(ms|s)", "<t>", text)  # 59.99s and 1m0s alike

    assert shape(there.value.message) == shape(here.value.message)
    assert there.value.message.startswith("tenant `research` has made 2 of 2 requests")
    assert {k: shape(v) for k, v in there.value.headers.items()} == {
        k: shape(v) for k, v in here.value.headers.items()
    }
    assert there.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert there.value.headers["x-ratelimit-remaining-tokens"] == "750"  # 150 used + 100 reserved
    assert int(there.value.headers["retry-after"]) in (59, 60)


async def test_settlement_is_idempotent_and_charges_overage(replicas: Any) -> None:
    tenant = research(tokens_per_minute=1000, tokens_per_day=10_000)
    replica = await replicas(tenant)
    ticket = await replica.backend.admit(tenant, 100, "k1", capped=True)
    assert replica.backend.inflight == {"k1": ("research", 100)}
    for _ in range(3):  # the same settlement, again and again: charged once
        await replica.settle(ticket, "k1", 150)
    assert replica.backend.inflight == {}
    assert replica.value(
        "meterproxy_quota_usage_ratio", tenant="research", limit="tokens_per_day"
    ) == pytest.approx(0.015)
    assert replica.value(
        "meterproxy_quota_usage_ratio", tenant="research", limit="tokens_per_minute"
    ) == pytest.approx(0.15)
    # An uncapped request is admitted while the window is not full, and its overage counts.
    big = await replica.backend.admit(tenant, 900, "k2", capped=False)
    await replica.settle(big, "k2", 1200)
    with pytest.raises(RateLimited) as refused:
        await replica.backend.admit(tenant, 10, "k3", capped=True)
    assert "has used 1,350 of 1,000 tokens in the last minute" in refused.value.message
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_dead_replicas_reservations_are_freed_within_the_ttl(replicas: Any) -> None:
    tenant = research(max_concurrent=2, tokens_per_day=1000)
    alive = await replicas(tenant, reservation_ttl_s=1.0)
    dead = await replicas(tenant, reservation_ttl_s=1.0, run=False)  # never refreshes: crashed
    held = await alive.backend.admit(tenant, 300, "alive-1", capped=True)
    await dead.backend.admit(tenant, 300, "dead-1", capped=True)
    with pytest.raises(RateLimited) as refused:
        await alive.backend.admit(tenant, 0, "x", capped=True)
    assert refused.value.limit == "max_concurrent"
    assert refused.value.headers["retry-after"] == "1"
    start = time.monotonic()
    while True:  # the dead replica's slot comes back within the TTL; the live one's stays
        try:
            second = await alive.backend.admit(tenant, 300, "alive-2", capped=True)
            break
        except RateLimited:
            await asyncio.sleep(0.05)
    freed_after = time.monotonic() - start
    assert freed_after <= 1.3
    await asyncio.sleep(1.5)  # the live replica refreshes its two: they never expire
    with pytest.raises(RateLimited):
        await alive.backend.admit(tenant, 0, "y", capped=True)
    await alive.settle(held, "alive-1", 10)
    await alive.settle(second, "alive-2", 10)
    # The dead one's 300 reserved tokens were freed with its slot: 20 used + 900 fits in 1000.
    await alive.backend.admit(tenant, 900, "z", capped=True)


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_down_then_back_in_both_failure_modes(
    replicas: Any, redis_server: RedisServer, mode: str
) -> None:
    tenant = research(requests_per_minute=100)
    replica = await replicas(tenant, on_error_rate=mode, on_error_budget=mode)
    await replica.backend.admit(tenant, 0, "before", capped=True)
    await redis_server.kill()
    if mode == "closed":
        with pytest.raises(QuotaUnavailable) as refused:
            await replica.backend.admit(tenant, 0, "during", capped=True)
        assert refused.value.status == 503 and refused.value.code == "quota_backend_unavailable"
        assert refused.value.message == (
            f"the quota store (Redis at 127.0.0.1:{redis_server.port}/0) cannot be reached, "
            "so the limits of tenant `research` cannot be checked and they fail closed "
            "(quota.on_backend_error); retry shortly"
        )
    else:
        ticket = await replica.backend.admit(tenant, 0, "during", capped=True)
        assert ticket.reserved == 0
        assert replica.value("meterproxy_quota_unchecked_admissions_total", tenant="research") == 1
    assert replica.value("meterproxy_quota_backend_up", backend="redis") == 0
    assert replica.value("meterproxy_quota_backend_errors_total", backend="redis", op="admit") == 1
    await redis_server.start()  # same port, empty
    await replica.backend.admit(tenant, 0, "after", capped=True)  # reconnected by itself
    assert replica.value("meterproxy_quota_backend_up", backend="redis") == 1


async def test_a_slow_redis_times_out_tightly(replicas: Any, redis_server: RedisServer) -> None:
    tenant = research(requests_per_minute=100)
    replica = await replicas(tenant, timeout_s=0.2)
    await replica.backend.admit(tenant, 0, "before", capped=True)
    redis_server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(QuotaUnavailable, match=r"did not answer within 0\.2 s"):
            await replica.backend.admit(tenant, 0, "during", capped=True)
        assert time.monotonic() - start < 0.5
    finally:
        redis_server.resume()
    await replica.backend.admit(tenant, 0, "after", capped=True)


async def test_budgets_are_rebuilt_from_the_ledger_after_a_flush(
    replicas: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Spend settled before the flush is read back from the ledger; spend settled while it
    was lost is added once, though its row reached the ledger too."""
    path = str(tmp_path / "usage.db")
    ledger = Ledger(open_store(f"sqlite:///{path}", LEDGER_SCHEMA), on_error=lambda kind: None)
    await ledger.open()
    tenant = research(tokens_per_day=1000, usd_per_month=5.0)
    now = time.time()
    ledger.add(settlement(request_id="old-1", tenant="research", ts=now, cost_usd=0.5))
    ledger.add(settlement(request_id="old-2", tenant="research", ts=now - 40 * 86400))
    ledger.add(settlement(request_id="other", tenant="support", ts=now))
    await ledger.flush()
    replica = await replicas(tenant, ledger=SqliteSpend(path))
    ticket = await replica.backend.admit(tenant, 0, "k1", capped=True)  # rebuilt first: 15
    assert replica.value("meterproxy_quota_rebuilds_total", tenant="research") == 1
    await replica.settle(ticket, "k1", 100, cost_usd=1.0, ts=now)
    ledger.add(
        settlement(
            request_id="k1",
            tenant="research",
            ts=now,
            cost_usd=1.0,
            usage=Usage(100, 0, None, None, Source.UPSTREAM),
        )
    )
    await ledger.flush()
    ratio = replica.value("meterproxy_quota_usage_ratio", tenant="research", limit="tokens_per_day")
    assert ratio == pytest.approx(0.115)  # 15 from the ledger + 100
    async with redis_server.client() as c:
        await c.flushall()
    # settled while Redis holds nothing: kept aside, and its row is in the ledger as well
    lost = await replica.backend.admit(tenant, 0, "k2", capped=True)  # rebuilds: 115
    async with redis_server.client() as c:
        await c.flushall()
    await replica.settle(lost, "k2", 200, cost_usd=2.0, ts=now)
    ledger.add(
        settlement(
            request_id="k2",
            tenant="research",
            ts=now,
            cost_usd=2.0,
            usage=Usage(200, 0, None, None, Source.UPSTREAM),
        )
    )
    await ledger.flush()
    await replica.backend.admit(tenant, 0, "k3", capped=True)  # rebuilds: 115 + 200
    check = await replica.backend.admit(tenant, 0, "k4", capped=False)
    await replica.settle(check, "k4", 0, cost_usd=0.0)
    assert replica.value(
        "meterproxy_quota_usage_ratio", tenant="research", limit="tokens_per_day"
    ) == pytest.approx(0.315)
    assert replica.value(
        "meterproxy_quota_usage_ratio", tenant="research", limit="usd_per_month"
    ) == pytest.approx((0.5 + 1.0 + 2.0) / 5.0)
    await replica.backend.check_drift()
    assert replica.value(
        "meterproxy_quota_drift_ratio", tenant="research", limit="tokens_per_day"
    ) == pytest.approx(0.0, abs=1e-9)
    # A row the store never saw (written by hand): the drift shows it.
    ledger.add(
        settlement(
            request_id="stray",
            tenant="research",
            ts=now,
            usage=Usage(50, 0, None, None, Source.UPSTREAM),
        )
    )
    await ledger.flush()
    await replica.backend.check_drift()
    assert replica.value(
        "meterproxy_quota_drift_ratio", tenant="research", limit="tokens_per_day"
    ) == pytest.approx(-0.05)
    await ledger.close()


async def test_a_settlement_held_through_an_outage_is_not_counted_twice(
    replicas: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Its row reached the ledger while Redis was down and Redis came back empty: the rebuild
    counts the row, and the settlement, applied after, is checked against the ledger."""
    path = str(tmp_path / "usage.db")
    ledger = Ledger(open_store(f"sqlite:///{path}", LEDGER_SCHEMA), on_error=lambda kind: None)
    await ledger.open()
    tenant = research(tokens_per_day=1000)
    replica = await replicas(tenant, ledger=SqliteSpend(path), run=False)
    backend = replica.backend
    ticket = await backend.admit(tenant, 0, "k1", capped=True)
    done = settlement(
        request_id="k1",
        tenant="research",
        ticket=ticket,
        ts=time.time(),
        usage=Usage(100, 0, None, None, Source.UPSTREAM),
    )
    await redis_server.kill()
    backend.settle(done)
    ledger.add(done)
    assert not await backend._apply_batch()  # Redis is down: held
    await ledger.flush()
    await redis_server.start()  # empty
    await backend.admit(tenant, 0, "k2", capped=True)  # rebuilt from the ledger: 100 (k1)
    assert await backend._apply_batch()  # k1 now: in the rebuilt sum already, so not charged
    second = await backend.admit(tenant, 0, "k3", capped=True)
    backend.settle(
        settlement(
            request_id="k3",
            tenant="research",
            ticket=second,
            ts=time.time(),
            usage=Usage(1, 0, None, None, Source.UPSTREAM),
        )
    )
    assert await backend._apply_batch()
    assert replica.value(
        "meterproxy_quota_usage_ratio", tenant="research", limit="tokens_per_day"
    ) == pytest.approx(0.101)
    await ledger.close()
