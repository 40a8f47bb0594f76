"""`meterproxy demo`: the proxy in front of a simulated vLLM server on a simulated GPU, with a
small built-in load from two tenants on two models, so /metrics (and Prometheus and Grafana,
with deploy/) show live, plausible figures on a machine without a GPU."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import config
from .app import PortInUse, RunningServer, create_app, start, stop
from .sim.upstream import Behavior, FakeUpstream
from .ui import terminal
from .ui import web as ui_web

log = logging.getLogger(__name__)

KEYS = {"research": "demo-research-key", "support": "demo-support-key"}
ADMIN_KEY = "demo-admin-key"  # reads the status page's data
SUMMARY_EVERY_S = 5.0
# Paced like an 8B model on a busy modern GPU: ~50-70 tokens/s per stream.
MODELS = {
    "llama-3.1-8b": Behavior(tokens=160, pace_s=0.016, first_token_s=0.06),
    "qwen2.5-7b": Behavior(tokens=100, pace_s=0.014, first_token_s=0.05),
}
PROMPTS = [
    "Summarize the attached incident report.",
    "Write a haiku about GPUs.",
    "Explain continuous batching to a new engineer, with an example. " * 6,
    "Translate this paragraph into French: " + "the quick brown fox " * 40,
]


def demo_tree(upstream_url: str, workdir: Path, port: int, host: str) -> dict[str, Any]:
    return {
        "listen": {"host": host, "port": port},
        "server": {"unready_delay_s": 0, "drain_timeout_s": 5},
        "upstreams": [
            {
                "name": "local-vllm",
                "url": upstream_url,
                "kind": "vllm",
                "gpus": [0],
                "refresh_interval_s": 5,
            }
        ],
        "energy": {"source": "simulated", "interval_s": 0.1},
        "pricing": {
            "upstreams": {"local-vllm": {"gpu_hour_usd": 2.5, "electricity_usd_per_kwh": 0.12}}
        },
        "auth": {"admin_keys": ["env:DEMO_ADMIN_KEY"]},
        "tenants": {
            "research": {
                "keys": ["env:DEMO_RESEARCH_KEY"],
                "limits": {
                    "tokens_per_minute": 400_000,
                    "tokens_per_day": 50_000_000,
                    "joules_per_day": 50_000_000,
                    "max_concurrent": 16,
                },
            },
            "support": {
                "keys": ["env:DEMO_SUPPORT_KEY"],
                "models": ["qwen*"],
                "limits": {
                    "requests_per_minute": 20,
                    "max_tokens_per_request": 64,
                    "usd_per_month": 100,
                },
            },
        },
        "ledger": {"path": str(workdir / "meterproxy-usage.db")},
        "quota": {"state_path": str(workdir / "meterproxy-quota.db")},
    }


@dataclass
class Demo:
    proxy: RunningServer
    upstream: FakeUpstream
    upstream_url: str
    registry: CollectorRegistry


@contextlib.asynccontextmanager
async def running(
    port: int = 8080,
    host: str = "127.0.0.1",
    workdir: Path | None = None,
    registry: CollectorRegistry | None = None,
) -> AsyncIterator[Demo]:
    """The simulated upstream and the proxy, started; stopped on exit."""
    fake = FakeUpstream("vllm", dict(MODELS), keep_seen=False)
    runner = web.AppRunner(fake.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    with tempfile.TemporaryDirectory() as tmp:
        tree = demo_tree(upstream_url, workdir or Path(tmp), port, host)
        settings = config.parse(
            tree,
            {
                "DEMO_RESEARCH_KEY": KEYS["research"],
                "DEMO_SUPPORT_KEY": KEYS["support"],
                "DEMO_ADMIN_KEY": ADMIN_KEY,
            },
            source="demo",
        )
        registry = registry or CollectorRegistry()
        proxy = await start(create_app(settings, registry=registry), host, port)
        try:
            yield Demo(proxy, fake, upstream_url, registry)
        finally:
            await stop(proxy)
            await runner.cleanup()


async def load(
    base_url: str, workers: int = 6, seed: int = 7, stop_after_s: float | None = None
) -> None:
    """Bounded background traffic: `workers` clients per tenant, each one request at a time."""
    rng = random.Random(seed)
    deadline = None if stop_after_s is None else asyncio.get_running_loop().time() + stop_after_s

    async def client(http: aiohttp.ClientSession, tenant: str) -> None:
        while deadline is None or asyncio.get_running_loop().time() < deadline:
            model = "qwen2.5-7b" if tenant == "support" or rng.random() < 0.4 else "llama-3.1-8b"
            body: dict[str, Any] = {
                "model": model,
                "stream": rng.random() < 0.8,
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            }
            if rng.random() < 0.25:
                body["max_tokens"] = rng.choice((32, 48, 64))  # some answers get truncated
            hang_up = rng.random() < 0.08  # and some clients leave early
            try:
                async with http.post(
                    base_url + "/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                ) as r:
                    if r.status == 429:
                        await asyncio.sleep(float(r.headers.get("Retry-After", "1")) / 4)
                        continue
                    lines = 0
                    async for _ in r.content:
                        lines += 1
                        if hang_up and lines > 20:
                            break
            except aiohttp.ClientError:
                await asyncio.sleep(0.5)
            await asyncio.sleep(rng.uniform(0.05, 0.4))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(client(http, tenant) for tenant in KEYS for _ in range(workers)))


async def main(port: int, host: str, data_dir: Path) -> int:
    try:
        async with running(port, host, workdir=data_dir) as demo:
            return await _show(demo, data_dir)
    except PortInUse as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


async def _show(demo: Demo, data_dir: Path) -> int:
    base = demo.proxy.url
    ledger = data_dir / "meterproxy-usage.db"
    print(
        f"""
meterproxy demo: a simulated vLLM server (llama-3.1-8b, qwen2.5-7b) on a simulated 700 W GPU,
and a small load from two tenants.

  status page   {base}/ui#key={ADMIN_KEY}
  proxy         {base}/v1        (OpenAI-compatible)
  keys          research: {KEYS["research"]}   support: {KEYS["support"]} (qwen* only)
                admin (status page data): {ADMIN_KEY}
  metrics       {base}/metrics
  try it        OPENAI_BASE_URL={base}/v1 OPENAI_API_KEY={KEYS["research"]} python your_app.py
  usage report  meterproxy usage --ledger {ledger} --by tenant --by model
  dashboards    docker compose -f deploy/docker-compose.yml up  (Prometheus + Grafana)

A summary follows every {SUMMARY_EVERY_S:g} s. Ctrl-C stops.
""",
        flush=True,
    )
    traffic = asyncio.create_task(load(base + "/v1"), name="demo-load")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), SUMMARY_EVERY_S)
            if not stopping.is_set():
                print(terminal.summary(ui_web.current(demo.proxy.runner.app)) + "\n", flush=True)
        print("stopping: the load first, then the proxy and the simulated server", flush=True)
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
    print(f"the ledger stays in {ledger}: meterproxy usage --ledger {ledger}", flush=True)
    return 0
