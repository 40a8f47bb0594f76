"""Replicas sharing one real redis-server, end to end through the proxy: per-minute limits
exact across three replicas, a nearly spent budget under 64 simultaneous requests, a killed
replica's reservations freed within the TTL, Redis killed and restarted under load in both
failure modes, and budgets rebuilt from the ledgers after a FLUSHALL."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from meterproxy.keys import LEDGER, RUNTIME
from meterproxy.quota_redis import RedisQuota
from meterproxy.sim.upstream import Behavior

from .conftest import Proxy, StartProxy, StartUpstream, Upstream
from .redis_support import RedisServer, redis_server
from .test_cli_serve import Process, launch

__all__ = ["redis_server"]  # the fixture

KEY = "replica-research-key"
ENV = {"RESEARCH_KEY": KEY}
MESSAGES = [{"role": "user", "content": "Say something about foxes"}]


def tree(
    up: Upstream, redis: RedisServer, quota: dict[str, Any] | None = None, **limits: Any
) -> dict[str, Any]:
    return {
        "upstreams": [{"name": "gpu", "url": up.url, "kind": "vllm"}],
        "tenants": {"research": {"keys": ["env:RESEARCH_KEY"], "limits": limits}},
        "quota": {
            "backend": "redis",
            "redis_url": redis.url,
            "timeout_s": 0.5,
            **(quota or {}),
        },
    }


def backend(proxy: Proxy) -> RedisQuota:
    quota = proxy.server.runner.app[RUNTIME].quota
    assert isinstance(quota, RedisQuota)
    return quota


async def post(
    http: aiohttp.ClientSession, proxy: Proxy, model: str = "llama", **body: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(
        proxy.base_url + "/chat/completions",
        json={"model": model, "messages": MESSAGES, **body},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        return r.status, await r.json(), dict(r.headers)


async def settled(proxies: list[Proxy], requests: int) -> None:
    """Until `requests` requests have settled and every replica has applied its settlements
    to Redis (a client may see its answer before its request has settled)."""
    for _ in range(500):
        if sum(len(p.settled) for p in proxies) >= requests and not any(
            backend(p).unapplied for p in proxies
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("settlements not applied")


async def drift(proxy: Proxy) -> float:
    """(Redis - ledger) / limit for tokens_per_day, once the ledger has written everything."""
    await proxy.server.runner.app[LEDGER].flush()
    await backend(proxy).check_drift()
    return proxy.sample("meterproxy_quota_drift_ratio", tenant="research", limit="tokens_per_day")


def used(proxy: Proxy, limit: str) -> float:
    return proxy.sample("meterproxy_quota_usage_ratio", tenant="research", limit=limit)


async def test_requests_per_minute_is_exact_across_three_replicas(
    start_upstream: StartUpstream, start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    up: Upstream = await start_upstream({"llama": Behavior(tokens=4)})
    replicas = [
        await start_proxy(tree(up, redis_server, requests_per_minute=10), ENV) for _ in range(3)
    ]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        results = await asyncio.gather(*(post(http, replicas[i % 3]) for i in range(90)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10 and statuses.count(429) == 80
    assert len(up.fake.seen) == 10
    _, body, headers = next(r for r in results if r[0] == 429)
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert body["error"]["message"].startswith(
        "tenant `research` has made 10 of 10 requests in the last minute; retry in "
    )
    assert (
        headers["x-ratelimit-remaining-requests"] == "0" and 1 <= int(headers["Retry-After"]) <= 60
    )
    rejected = sum(
        p.sample(
            "meterproxy_quota_rejections_total", tenant="research", limit="requests_per_minute"
        )
        for p in replicas
    )
    assert rejected == 80
    assert all(p.sample("meterproxy_quota_backend_up", backend="redis") == 1 for p in replicas)


@pytest.mark.parametrize("capped", [False, True], ids=["uncapped", "capped"])
async def test_64_simultaneous_requests_on_a_nearly_spent_budget(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    redis_server: RedisServer,
    capped: bool,
) -> None:
    """Uncapped requests may overspend by at most one request; capped ones never."""
    up: Upstream = await start_upstream({"llama": Behavior(tokens=50)})
    limit = 1000
    replicas = [
        await start_proxy(tree(up, redis_server, tokens_per_day=limit), ENV) for _ in range(3)
    ]
    cap = {"max_tokens": 20} if capped else {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        _, first, _ = await post(http, replicas[0], **cap)
        per_request = first["usage"]["total_tokens"]
        spent, sent = per_request, 1
        while spent + per_request < limit - 10:  # nearly spent: less than a request left
            await settled(replicas, sent)  # (an uncapped reservation exceeds the budget)
            _, body, _ = await post(http, replicas[sent % 3], **cap)
            spent, sent = spent + body["usage"]["total_tokens"], sent + 1
        await settled(replicas, sent)
        before = spent
        results = await asyncio.gather(*(post(http, replicas[i % 3], **cap) for i in range(64)))
        await settled(replicas, sent + 64)
    admitted = [body for status, body, _ in results if status == 200]
    refused = [body for status, body, _ in results if status == 429]
    assert len(admitted) + len(refused) == 64
    assert all(b["error"]["code"] == "insufficient_quota" for b in refused)
    total = before + sum(b["usage"]["total_tokens"] for b in admitted)
    assert total == pytest.approx(used(replicas[0], "tokens_per_day") * limit)
    if capped:
        assert total <= limit and len(admitted) <= 1
    else:
        assert len(admitted) == 1 and total - limit <= per_request


@pytest.mark.slow
async def test_a_killed_replica_frees_its_reservations_within_the_ttl(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    up: Upstream = await start_upstream(
        {"slow": Behavior(tokens=400, pace_s=0.05), "llama": Behavior(tokens=4)}
    )
    ttl = 2.0
    config = tree(up, redis_server, {"reservation_ttl_s": ttl}, max_concurrent=2)
    cfg = tmp_path / "replica.yaml"
    cfg.write_text(yaml.safe_dump({**config, "server": {"unready_delay_s": 0}}))
    monkeypatch.setenv("RESEARCH_KEY", KEY)
    doomed: Process = await launch("--config", str(cfg), cwd=tmp_path)
    survivor = await start_proxy(config, ENV)
    try:
        async with aiohttp.ClientSession() as http:
            streams = []
            for _ in range(2):
                r = await http.post(
                    doomed.url + "/v1/chat/completions",
                    json={"model": "slow", "messages": MESSAGES, "stream": True},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                assert r.status == 200 and (await r.content.readline()).startswith(b"data: ")
                streams.append(r)
            status, body, _ = await post(http, survivor)
            assert status == 429 and "2 of 2 concurrent requests" in body["error"]["message"]
            doomed.proc.send_signal(signal.SIGKILL)  # both reservations outstanding
            await doomed.proc.wait()
            killed = time.monotonic()
            while (await post(http, survivor))[0] == 429:
                assert time.monotonic() - killed < ttl + 1.0, "reservations not freed in time"
                await asyncio.sleep(0.1)
            freed_after = time.monotonic() - killed
            for r in streams:
                r.close()
        assert 0 < freed_after <= ttl + 0.5
    finally:
        if doomed.proc.returncode is None:
            doomed.proc.kill()
            await doomed.proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_killed_and_restarted_under_load(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    redis_server: RedisServer,
    mode: str,
) -> None:
    up: Upstream = await start_upstream({"llama": Behavior(tokens=6, pace_s=0.002)})
    config = tree(
        up,
        redis_server,
        {"on_backend_error": mode, "timeout_s": 2.0},  # (killed: refused at once)
        requests_per_minute=100_000,
        tokens_per_day=10_000_000,
    )
    replicas = [await start_proxy(config, ENV) for _ in range(2)]
    log: list[tuple[float, int, str | None]] = []
    marks: dict[str, float] = {}
    t0 = time.monotonic()

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        while "back" not in marks or time.monotonic() - marks["back"] < 2.0:
            status, body, _ = await post(http, replicas[i % 2])
            log.append((time.monotonic(), status, body.get("error", {}).get("code")))
            await asyncio.sleep(0.01)

    async def outage() -> None:
        await asyncio.sleep(1.0)
        marks["killed"] = time.monotonic()
        await redis_server.kill()
        await asyncio.sleep(1.5)
        marks["restarting"] = time.monotonic()
        await redis_server.start()  # empty: no persistence
        marks["back"] = time.monotonic()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(outage(), *(client(i, http) for i in range(6)))
    await settled(replicas, len(log))
    by_phase: dict[str, collections.Counter[tuple[int, str | None]]] = {
        phase: collections.Counter() for phase in ("before", "during", "after")
    }
    for t, status, code in log:
        if t < marks["killed"] - 0.1:
            by_phase["before"][(status, code)] += 1
        elif marks["killed"] + 0.3 < t < marks["restarting"]:
            by_phase["during"][(status, code)] += 1
        elif t > marks["back"] + 1.0:  # (a rebuild from the ledger first)
            by_phase["after"][(status, code)] += 1
    assert t0 < marks["killed"]
    timeline = [(round(t - marks["killed"], 3), status) for t, status, _ in log if status != 200]
    assert set(by_phase["before"]) == {(200, None)}, timeline
    assert set(by_phase["after"]) == {(200, None)}, timeline  # recovered, no restart
    if mode == "closed":
        assert set(by_phase["during"]) == {(503, "quota_backend_unavailable")}
    else:
        assert set(by_phase["during"]) == {(200, None)}
        unchecked = sum(
            p.sample("meterproxy_quota_unchecked_admissions_total", tenant="research")
            for p in replicas
        )
        assert unchecked >= by_phase["during"][(200, None)] > 0
    for p in replicas:
        assert p.sample("meterproxy_quota_backend_up", backend="redis") == 1
        assert p.total("meterproxy_quota_backend_errors_total") > 0
        # Every 200 is charged exactly once: Redis agrees with each replica's ledger.
        assert await drift(p) == pytest.approx(0.0, abs=1e-12)


async def test_budgets_are_rebuilt_from_the_ledgers_after_a_flushall(
    start_upstream: StartUpstream, start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    up: Upstream = await start_upstream({"llama": Behavior(tokens=50)})
    config = tree(up, redis_server, {"reservation_ttl_s": 1.5}, tokens_per_day=400)
    replicas = [await start_proxy(config, ENV) for _ in range(3)]  # a ledger each
    async with aiohttp.ClientSession() as http:
        spent = 0
        for i in range(5):
            await settled(replicas, i)
            status, body, _ = await post(http, replicas[i % 3])
            assert status == 200
            spent += body["usage"]["total_tokens"]
        await settled(replicas, 5)
        assert used(replicas[1], "tokens_per_day") * 400 == pytest.approx(spent)  # settled last
        async with redis_server.client() as c:
            await c.flushall()
        await asyncio.sleep(1.0)  # each replica notices within a third of the TTL and rebuilds
        rebuilt = sum(p.total("meterproxy_quota_rebuilds_total") for p in replicas)
        assert rebuilt == 3 + 3  # at first sight of the empty store, and after the flush
        statuses: list[int] = []
        while spent < 400 and len(statuses) < 10:
            await settled(replicas, 5 + len(statuses))
            status, body, _ = await post(http, replicas[len(statuses) % 3])
            statuses.append(status)
            if status == 200:
                spent += body["usage"]["total_tokens"]
        await settled(replicas, 5 + len(statuses))
        status, body, _ = await post(http, replicas[1])
        await settled(replicas, 6 + len(statuses))
    assert statuses == [200] * len(statuses)  # what was left of the budget, and not more
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    for p in replicas:  # Redis holds exactly what each replica's ledger says
        assert await drift(p) == pytest.approx(0.0, abs=1e-12)
