"""Shared fixtures: the simulated upstream and the proxy, each on an ephemeral 127.0.0.1 port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from meterproxy import config
from meterproxy.app import RunningServer, create_app, start, stop
from meterproxy.settlement import Settlement
from meterproxy.sim.upstream import Behavior, FakeUpstream
from meterproxy.tokens import TokenCounter


@dataclass
class Upstream:
    fake: FakeUpstream
    url: str  # the /v1 base


@dataclass
class Proxy:
    server: RunningServer
    registry: CollectorRegistry
    settled: list[Settlement] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def total(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


StartUpstream = Callable[..., Any]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    runners: list[web.AppRunner] = []

    async def _start(models: dict[str, Behavior] | None = None, flavor: str = "vllm") -> Upstream:
        fake = FakeUpstream(flavor, models or {"sim-llama": Behavior()})
        runner, url = await _serve(fake.app())
        runners.append(runner)
        return Upstream(fake, url + "/v1")

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def upstream(start_upstream: StartUpstream) -> Upstream:
    result: Upstream = await start_upstream()
    return result


StartProxy = Callable[..., Any]


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    servers: list[RunningServer] = []

    async def _start(tree: dict[str, Any], environ: dict[str, str] | None = None) -> Proxy:
        tree = {
            "server": {"unready_delay_s": 0, "drain_timeout_s": 5},
            "ledger": {"path": str(tmp_path / f"ledger-{len(servers)}.db")},
            "quota": {"state_path": str(tmp_path / f"quota-{len(servers)}.db")},
            # Tests repeat their prompts: duplicate detection (tested in test_e2e_value and
            # test_value_*) is off unless a test's own `value` section turns it on.
            "value": {"duplicate_window_s": 0},
            **tree,
        }
        settings = config.parse(tree, environ or {})
        registry = CollectorRegistry()
        proxy_settled: list[Settlement] = []
        app = create_app(
            settings, registry=registry, sinks=[proxy_settled.append], tokens=TokenCounter(None)
        )
        server = await start(app, "127.0.0.1", 0)
        servers.append(server)
        return Proxy(server, registry, proxy_settled)

    yield _start
    for server in servers:
        await stop(server)


@pytest.fixture
async def proxy(start_proxy: StartProxy, upstream: Upstream) -> Proxy:
    result: Proxy = await start_proxy(
        {"upstreams": [{"name": "local", "url": upstream.url, "kind": "vllm"}]}
    )
    return result


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
