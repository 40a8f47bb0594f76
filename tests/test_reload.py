"""Hot reload from a real file: a bad file keeps the old configuration; a good one swaps a whole
new view, keeps the pools of unchanged upstreams, gives changed and new upstreams fresh pools,
closes the pools of replaced and removed ones once in-flight requests had time to finish, and
hands the new tenancy to the quota backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from meterproxy import config, reload
from meterproxy.app import create_app, new_session
from meterproxy.config import Settings, Upstream
from meterproxy.keys import RUNTIME
from meterproxy.quota_local import LocalQuota
from meterproxy.runtime import Live, Runtime, UpstreamState


def tree(path: Path, url: str) -> dict[str, Any]:
    return {
        "server": {"drain_timeout_s": 0.05},
        "upstreams": [
            {"name": "kept", "url": url, "models": ["*"]},
            {"name": "changed", "url": url, "models": ["m2"]},
            {"name": "removed", "url": url, "models": ["m3"]},
        ],
        "ledger": {"enabled": False},
        "quota": {"timezone": "UTC", "state_path": str(path.parent / "q.db")},
    }


@dataclass
class Setup:
    runtime: Runtime
    registry: CollectorRegistry
    path: Path
    url: str  # the local upstream's /v1 base
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    def tree(self) -> dict[str, Any]:
        return tree(self.path, self.url)

    def write(self, text: str) -> None:
        self.path.write_text(text, encoding="utf-8")

    def load(self) -> Settings:
        return config.load(self.path, {})

    def new_session(self, upstream: Upstream) -> aiohttp.ClientSession:
        session = new_session(upstream)
        self.sessions.append(session)
        return session

    async def reload(self) -> bool:
        return await reload.reload(self.runtime, self.load, self.new_session)

    def reloads(self, result: str) -> float:
        return (
            self.registry.get_sample_value("meterproxy_config_reloads_total", {"result": result})
            or 0.0
        )


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "d1", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    path = tmp_path / "meterproxy.yaml"
    path.write_text(yaml.safe_dump(tree(path, url)), encoding="utf-8")
    settings = config.load(path, {})
    registry = CollectorRegistry()
    s = Setup(create_app(settings, registry=registry, energy=None)[RUNTIME], registry, path, url)
    states = {u.name: UpstreamState(u, s.new_session(u)) for u in settings.upstreams}
    s.runtime.swap(Live(settings, s.runtime.router, states))
    yield s
    await s.runtime.tasks.stop("background")
    for session in s.sessions:
        await session.close()
    await runner.cleanup()


@pytest.mark.parametrize(
    "text",
    [
        "upstreams: [}\n",  # not YAML
        "upstreams: []\n",  # no upstream
        "upstreams:\n- {name: a, url: 'http://x/v1', timeouts: {idle: -1}}\n",
        "listen: {port: 8080}\nbogus_section: 1\n",
    ],
    ids=["yaml", "empty", "negative", "unknown-key"],
)
async def test_a_bad_file_keeps_the_old_configuration(setup: Setup, text: str) -> None:
    before = setup.runtime.live
    setup.write(text)
    assert await setup.reload() is False
    assert setup.runtime.live is before
    assert setup.reloads("error") == 1 and setup.reloads("ok") == 0
    assert not any(state.session.closed for state in before.upstreams.values())


async def test_a_good_file_swaps_a_new_view_and_sorts_the_pools(setup: Setup) -> None:
    rt = setup.runtime
    before = rt.live
    old = dict(before.upstreams)
    tree = setup.tree()
    tree["upstreams"] = [
        {"name": "kept", "url": setup.url, "models": ["*"]},
        {"name": "changed", "url": setup.url, "models": ["m2"], "timeouts": {"idle": 5}},
        {"name": "added", "url": setup.url, "models": ["m4"]},
    ]
    setup.write(yaml.safe_dump(tree))
    assert await setup.reload() is True
    live = rt.live
    assert live is not before and setup.reloads("ok") == 1
    assert set(live.upstreams) == {"kept", "changed", "added"}
    assert live.upstreams["kept"] is old["kept"]  # unchanged: pool and occupancy kept
    assert live.upstreams["changed"].session is not old["changed"].session
    assert live.upstreams["changed"].upstream.timeouts.idle_s == 5
    assert not live.upstreams["added"].session.closed
    assert rt.router.resolve("m4") is not None and rt.router.resolve("m3") is None
    assert rt.router.resolve("d1") is not None  # the kept upstream's models, listed again
    # The retired pools close once the drain time has passed; the others stay open.
    retired = [old["changed"].session, old["removed"].session]
    assert not any(session.closed for session in retired)
    for _ in range(100):
        if all(session.closed for session in retired):
            break
        await asyncio.sleep(0.01)
    assert all(session.closed for session in retired)
    assert not any(state.session.closed for state in live.upstreams.values())


async def test_a_request_in_flight_keeps_the_view_it_read(setup: Setup) -> None:
    held = setup.runtime.live
    tree = setup.tree()
    tree["upstreams"] = tree["upstreams"][:1]
    setup.write(yaml.safe_dump(tree))
    assert await setup.reload() is True
    assert set(held.upstreams) == {"kept", "changed", "removed"}
    assert held.router.resolve("m2") is not None and setup.runtime.router.resolve("m2") is None


async def test_the_quota_backend_gets_the_new_tenancy(setup: Setup) -> None:
    quota = setup.runtime.quota
    assert isinstance(quota, LocalQuota)
    tree = setup.tree()
    tree["quota"]["timezone"] = "Europe/Paris"
    setup.write(yaml.safe_dump(tree))
    assert await setup.reload() is True
    assert str(quota.quota.zone) == "Europe/Paris"
