"""`meterproxy demo`: the proxy in front of a simulated vLLM server on a simulated GPU, with a
small built-in load from three tenants on two models, so /metrics (and Prometheus and Grafana,
with deploy/) show live, plausible figures on a machine without a GPU.

The load runs tasks: `research` runs tasks of several calls and most succeed; `support` runs
short ones under tight limits and fewer succeed; `tokenmaxx` loops one prompt to climb a
token leaderboard and rarely reports a result. Each task's calls share an x-meterproxy-task
header and its outcome is reported to /v1/feedback, so the Value dashboard and
`meterproxy leaderboard` tell the story: most tokens is not most value."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import config
from .app import PortInUse, RunningServer, create_app, start, stop
from .policy import hash_key
from .sim.upstream import Behavior, FakeUpstream
from .ui import terminal
from .ui import web as ui_web

log = logging.getLogger(__name__)

KEYS = {
    "research": "demo-research-key",
    "support": "demo-support-key",
    "tokenmaxx": "demo-tokenmaxx-key",
}
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
# The one prompt the token-maxing script sends, again and again.
BURN_PROMPT = "Write the longest essay you can about tokens. " * 3


@dataclass(frozen=True)
class Habit:
    """How a simulated tenant works: calls per task, the chance a task succeeds, the chance it
    reports the outcome at all, and whether it repeats one prompt (a token-maxing loop)."""

    calls: tuple[int, int]
    success_rate: float
    reports: float = 1.0
    burns: bool = False


# Each client is one user of its tenant (the body's `user`); the leaderboard shows users only by
# the aliases configured below, or as short salted hashes.
USERS = {
    "research": ("alice@example.com", "bob@example.com", "chen@example.com"),
    "support": ("helpdesk-1", "helpdesk-2"),
    "tokenmaxx": ("grind-loop@example.com",),
}
ALIASES = {"alice@example.com": "alice", "grind-loop@example.com": "the token loop"}
HABITS = {
    "research": Habit(calls=(2, 4), success_rate=0.8),
    "support": Habit(calls=(1, 2), success_rate=0.55),
    "tokenmaxx": Habit(calls=(4, 6), success_rate=0.3, reports=0.25, burns=True),
}


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
        "auth": {"admin_keys": [f"sha256:{hash_key(ADMIN_KEY)}"]},
        "tenants": {
            "research": {
                "keys": [f"sha256:{hash_key(KEYS['research'])}"],
                "limits": {
                    "tokens_per_minute": 400_000,
                    "tokens_per_day": 50_000_000,
                    "joules_per_day": 50_000_000,
                    "max_concurrent": 16,
                },
            },
            "support": {
                "keys": [f"sha256:{hash_key(KEYS['support'])}"],
                "models": ["qwen*"],
                "limits": {
                    "requests_per_minute": 20,
                    "max_tokens_per_request": 64,
                    "usd_per_month": 100,
                },
            },
            "tokenmaxx": {
                "keys": [f"sha256:{hash_key(KEYS['tokenmaxx'])}"],
                "models": ["llama*"],
                "limits": {"tokens_per_minute": 400_000, "max_concurrent": 8},
            },
        },
        # Short windows, so tasks close (and the Value dashboard moves) within seconds.
        "value": {
            "task_idle_s": 10,
            "outcome_grace_s": 1,
            "duplicate_window_s": 120,
            "user_aliases": ALIASES,
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
    config_path: Path


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
        where = workdir or Path(tmp)
        tree = demo_tree(upstream_url, where, port, host)
        # Written out (keys hashed) for `meterproxy leaderboard --config` and its user aliases.
        config_path = where / "meterproxy-demo.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(tree, sort_keys=False))
        settings = config.parse(tree, {}, source=str(config_path))
        registry = registry or CollectorRegistry()
        proxy = await start(create_app(settings, registry=registry), host, port)
        try:
            yield Demo(proxy, fake, upstream_url, registry, config_path)
        finally:
            await stop(proxy)
            await runner.cleanup()


async def load(
    base_url: str, workers: int = 6, seed: int = 7, stop_after_s: float | None = None
) -> None:
    """Bounded background traffic: `workers` clients per tenant, each running one task at a
    time (its calls one after another, then its outcome reported)."""
    rng = random.Random(seed)
    run = os.urandom(4).hex()  # task ids (and so prompts) of two loads never meet
    deadline = None if stop_after_s is None else asyncio.get_running_loop().time() + stop_after_s

    def running() -> bool:
        return deadline is None or asyncio.get_running_loop().time() < deadline

    async def call(
        http: aiohttp.ClientSession, tenant: str, user: str, task: str, step: int
    ) -> bool:
        """One call of a task (retried after a 429); False when it failed and is worth a retry
        (a client that hangs up on purpose does not retry)."""
        habit = HABITS[tenant]
        if habit.burns:
            model, text = "llama-3.1-8b", BURN_PROMPT
        else:
            model = "qwen2.5-7b" if tenant == "support" or rng.random() < 0.4 else "llama-3.1-8b"
            text = f"{rng.choice(PROMPTS)} (ticket {task}, step {step})"
        body: dict[str, Any] = {
            "model": model,
            "stream": habit.burns or rng.random() < 0.8,
            "messages": [{"role": "user", "content": text}],
            "user": user,
        }
        if not habit.burns and rng.random() < 0.25:
            body["max_tokens"] = rng.choice((32, 48, 64))  # some answers get truncated
        hang_up = not habit.burns and rng.random() < 0.08  # and some clients leave early
        headers = {"Authorization": f"Bearer {KEYS[tenant]}", "x-meterproxy-task": task}
        while running():
            try:
                async with http.post(
                    base_url + "/chat/completions", json=body, headers=headers
                ) as r:
                    if r.status == 429:
                        # Back off, but not for longer than the task's idle window.
                        await asyncio.sleep(min(float(r.headers.get("Retry-After", "1")) / 4, 2))
                        continue
                    lines = 0
                    async for _ in r.content:
                        lines += 1
                        if hang_up and lines > 20:
                            return True
                    return r.status < 500
            except aiohttp.ClientError:
                await asyncio.sleep(0.5)
                return False
        return False

    async def client(http: aiohttp.ClientSession, tenant: str, number: int) -> None:
        habit, user = HABITS[tenant], USERS[tenant][number % len(USERS[tenant])]
        tasks = 0
        while running():
            tasks += 1
            task = f"{tenant}-{run}-{number}-{tasks}"
            for step in range(rng.randint(*habit.calls)):
                if not await call(http, tenant, user, task, step):
                    await call(http, tenant, user, task, step)  # one retry of a failed call
                await asyncio.sleep(rng.uniform(0.02, 0.2))
            if running() and rng.random() < habit.reports:
                outcome = {"task_id": task, "success": rng.random() < habit.success_rate}
                try:
                    async with http.post(
                        base_url + "/feedback",
                        json={**outcome, "metric": "demo_goal"},
                        headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                    ) as r:
                        await r.read()
                except aiohttp.ClientError:
                    pass
            await asyncio.sleep(rng.uniform(0.05, 0.4))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(client(http, tenant, n) for tenant in KEYS for n in range(workers)))


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
and a small load from three tenants running tasks and reporting their outcomes.

  status page   {base}/ui#key={ADMIN_KEY}
  proxy         {base}/v1        (OpenAI-compatible)
  keys          research: {KEYS["research"]}   support: {KEYS["support"]} (qwen* only)
                tokenmaxx: {KEYS["tokenmaxx"]}   admin (status page data): {ADMIN_KEY}
  metrics       {base}/metrics
  try it        OPENAI_BASE_URL={base}/v1 OPENAI_API_KEY={KEYS["research"]} python your_app.py
  usage report  meterproxy usage --ledger {ledger} --by tenant --by model
  dashboards    docker compose -f deploy/docker-compose.yml up  (Prometheus + Grafana)
  leaderboard   meterproxy leaderboard --config {demo.config_path} --by tenant|user|model

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
