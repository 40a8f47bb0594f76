"""Model discovery against a local upstream: the router is rebuilt and swapped only when a
`["*"]` upstream's list changes; failures change nothing; readiness follows the upstreams'
recent answers; on-demand refreshes are rate-limited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from meterproxy import config, discovery
from meterproxy.app import create_app, new_session
from meterproxy.keys import RUNTIME
from meterproxy.runtime import Live, Runtime, UpstreamState

S = 1_000_000_000


@dataclass
class FakeModels:
    """An upstream's /v1/models: what it lists, its status, the Authorization it got."""

    ids: list[str] = field(default_factory=lambda: ["a"])
    status: int = 200
    body: bytes | None = None
    seen_auth: list[str | None] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen_auth.append(request.headers.get("Authorization"))
        if self.body is not None:
            return web.Response(body=self.body, status=self.status)
        data = [{"id": i, "object": "model", "created": 1, "owned_by": "vllm"} for i in self.ids]
        return web.json_response({"object": "list", "data": data}, status=self.status)


class Clock:
    def __init__(self) -> None:
        self.now_ns = 1_000 * S

    def __call__(self) -> int:
        return self.now_ns


@dataclass
class Setup:
    runtime: Runtime
    fake: FakeModels
    clock: Clock


Make = Callable[..., Any]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def _make(
        models: list[str] | None = None, *, api_key: str | None = None, url: str | None = None
    ) -> Setup:
        fake = FakeModels()
        app = web.Application()
        app.router.add_get("/v1/models", fake.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        upstream: dict[str, Any] = {
            "name": "up",
            "url": url or f"http://127.0.0.1:{runner.addresses[0][1]}/v1",
            "models": models or ["*"],
            "refresh_interval_s": 10,
        }
        environ = {}
        if api_key is not None:
            upstream["api_key_env"] = "UP_KEY"
            environ["UP_KEY"] = api_key
        settings = config.parse({"upstreams": [upstream], "ledger": {"enabled": False}}, environ)
        clock = Clock()
        rt = create_app(settings, registry=CollectorRegistry(), clock=clock, energy=None)[RUNTIME]
        states = {u.name: UpstreamState(u, new_session(u)) for u in settings.upstreams}
        rt.swap(Live(settings, rt.router, states))
        sessions.extend(state.session for state in states.values())
        return Setup(rt, fake, clock)

    yield _make
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


async def test_the_router_is_swapped_only_when_the_list_changes(make: Make) -> None:
    s: Setup = await make()
    rt, upstream = s.runtime, s.runtime.settings.upstreams[0]
    before = rt.live
    assert rt.router.resolve("a") is None
    await discovery.refresh(rt, upstream)
    first = rt.live
    assert first is not before and rt.router.resolve("a") is not None
    assert first.upstreams is before.upstreams and first.settings is before.settings
    await discovery.refresh(rt, upstream)
    assert rt.live is first  # the same list: nothing swapped
    s.fake.ids = ["a", "b"]
    await discovery.refresh(rt, upstream)
    assert rt.live is not first and rt.router.resolve("b") is not None
    assert [m["id"] for m in rt.router.listing] == ["a", "b"]


async def test_an_upstream_with_a_fixed_list_is_asked_but_never_rerouted(make: Make) -> None:
    s: Setup = await make(["m1"])
    rt = s.runtime
    before = rt.live
    await discovery.refresh(rt, rt.settings.upstreams[0])
    assert rt.live is before and len(s.fake.seen_auth) == 1
    assert rt.live.upstreams["up"].last_answer_ns == s.clock.now_ns


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, None), (404, None), (200, b"<html>not a list</html>"), (200, b'{"data": "a"}')],
    ids=["500", "404", "html", "not-a-list"],
)
async def test_a_failed_listing_changes_no_route_but_counts_as_an_answer(
    make: Make, status: int, body: bytes | None
) -> None:
    s: Setup = await make()
    rt = s.runtime
    await discovery.refresh(rt, rt.settings.upstreams[0])
    known = rt.live
    s.fake.status, s.fake.body = status, body
    s.clock.now_ns += 5 * S
    await discovery.refresh(rt, rt.settings.upstreams[0])
    assert rt.live is known and rt.router.resolve("a") is not None
    assert rt.live.upstreams["up"].last_answer_ns == s.clock.now_ns


async def test_an_unreachable_upstream_is_not_an_answer(make: Make) -> None:
    s: Setup = await make(url="http://127.0.0.1:9/v1")  # discard port: nothing listens
    rt = s.runtime
    before = rt.live
    assert await discovery.fetch_models(rt, rt.settings.upstreams[0]) is None
    await discovery.refresh(rt, rt.settings.upstreams[0])
    assert rt.live is before and rt.live.upstreams["up"].last_answer_ns is None
    assert not discovery.is_ready(rt)


async def test_the_listing_is_asked_with_the_upstreams_key(make: Make) -> None:
    s: Setup = await make(api_key="sk-up")
    await discovery.refresh(s.runtime, s.runtime.settings.upstreams[0])
    assert s.fake.seen_auth == ["Bearer sk-up"]
    bare: Setup = await make()
    await discovery.refresh(bare.runtime, bare.runtime.settings.upstreams[0])
    assert bare.fake.seen_auth == [None]


async def test_an_upstream_removed_by_a_reload_is_not_asked(make: Make) -> None:
    s: Setup = await make()
    rt = s.runtime
    upstream = rt.settings.upstreams[0]
    rt.swap(Live(rt.settings, rt.router, {}))
    assert await discovery.fetch_models(rt, upstream) is None
    assert s.fake.seen_auth == []


async def test_ready_while_an_upstream_answered_within_three_refresh_intervals(
    make: Make,
) -> None:
    s: Setup = await make()
    rt = s.runtime
    assert not discovery.is_ready(rt)
    await discovery.refresh_all(rt)
    assert discovery.is_ready(rt)
    s.clock.now_ns += 30 * S  # 3 x refresh_interval_s: still ready
    assert discovery.is_ready(rt)
    s.clock.now_ns += 1
    assert not discovery.is_ready(rt)
    await discovery.refresh_all(rt)
    assert discovery.is_ready(rt)
    rt.lifecycle.draining = True
    assert not discovery.is_ready(rt)


async def test_on_demand_refreshes_run_at_most_every_five_seconds(make: Make) -> None:
    s: Setup = await make()
    rt = s.runtime
    assert await discovery.refresh_on_demand(rt) is True
    assert await discovery.refresh_on_demand(rt) is False
    s.clock.now_ns += discovery.ON_DEMAND_MIN_INTERVAL_NS - 1
    assert await discovery.refresh_on_demand(rt) is False
    s.clock.now_ns += 1
    assert await discovery.refresh_on_demand(rt) is True
    assert len(s.fake.seen_auth) == 2
    fixed: Setup = await make(["m1"])
    assert await discovery.refresh_on_demand(fixed.runtime) is False  # nothing to discover
    assert fixed.fake.seen_auth == []


async def test_a_poller_ends_when_its_upstream_is_replaced(make: Make) -> None:
    s: Setup = await make()
    rt = s.runtime
    upstream = rt.settings.upstreams[0]
    fast = config.Upstream(upstream.name, upstream.url, refresh_interval_s=0.01)
    state = rt.live.upstreams["up"]
    rt.swap(Live(rt.settings, rt.router, {"up": UpstreamState(fast, state.session)}))
    # A poller of the old upstream object returns at its first wake-up...
    stale = config.Upstream(upstream.name, upstream.url, refresh_interval_s=0.01)
    await asyncio.wait_for(discovery.poll(rt, stale), 1.0)
    # ...while the current one keeps refreshing until cancelled.
    task = asyncio.create_task(discovery.poll(rt, fast))
    await asyncio.sleep(0.1)
    assert not task.done() and len(s.fake.seen_auth) >= 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
