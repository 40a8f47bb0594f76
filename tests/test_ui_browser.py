"""The status page in a real headless Chromium, under the demo's load (the simulated vLLM server
on a simulated GPU, two tenants): it renders, keeps updating, and the figures it shows agree
with /metrics within their rounding. A screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import asyncio
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from meterproxy import config, demo
from meterproxy.app import create_app, start, stop
from meterproxy.sim.upstream import FakeUpstream
from meterproxy.tokens import TokenCounter

from .chromium import Page, chromium, chromium_or_skip

ADMIN_KEY = "ui-test-admin-key"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


class Exposition:
    """/metrics text, parsed independently of the page's code."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            m = re.match(r"^([a-z_]+)(?:\{(.*)\})? ([0-9.e+-]+|NaN|\+Inf)$", line)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
                self.samples.append((m.group(1), labels, float(m.group(3))))

    def sum(self, name: str, **labels: str) -> float:
        return sum(
            v
            for n, got, v in self.samples
            if n == name and all(got.get(k) == want for k, want in labels.items())
        )

    def tokens(self, **labels: str) -> float:
        return sum(self.sum("meterproxy_tokens_total", type=t, **labels) for t in TOKEN_TYPES)

    def ttft(self, q: float, **labels: str) -> float:
        """histogram_quantile as Prometheus documents it, from the cumulative buckets."""
        counts: dict[float, float] = defaultdict(float)
        for n, got, v in self.samples:
            if n == "meterproxy_time_to_first_token_seconds_bucket" and all(
                got.get(k) == want for k, want in labels.items()
            ):
                counts[float(got["le"])] += v
        bounds = sorted(counts)
        rank = q * counts[math.inf]
        previous_bound, previous_count = 0.0, 0.0
        for bound in bounds:
            if counts[bound] >= rank:
                if math.isinf(bound):
                    return previous_bound
                share = (rank - previous_count) / (counts[bound] - previous_count)
                return previous_bound + (bound - previous_bound) * share
            previous_bound, previous_count = bound, counts[bound]
        raise AssertionError("no buckets")


TOKEN_TYPES = ("prompt", "completion")  # cached and reasoning tokens are parts of these


def shown(text: str) -> tuple[float, float]:
    """A figure as the page prints it -> (value, half its last digit), in base units."""
    t = text.replace(",", "").replace("$", "").strip()
    scale = 1.0
    for suffix, factor in ((" ms", 1e-3), (" s", 1.0), (" W", 1.0), ("%", 0.01)):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], factor
            break
    value = float(t) * scale
    if "e" in t:
        return value, abs(value) * 0.005
    decimals = len(t.split(".")[1]) if "." in t else 0
    return value, 0.5 * 10**-decimals * scale


def agrees(text: str, expected: float, slack: float = 1e-9) -> bool:
    value, half_step = shown(text)
    return abs(value - expected) <= half_step + slack + 1e-9 * abs(expected)


async def cells(page: Page, selector: str, key: str) -> dict[str, dict[str, str]]:
    """{row key: {data-field: text}} for the rows a selector finds."""
    found: dict[str, dict[str, str]] = await page.evaluate(
        f"""Object.fromEntries([...document.querySelectorAll({selector!r})].map((row) => [
            {key},
            Object.fromEntries([...row.querySelectorAll("[data-field]")].map(
                (c) => [c.dataset.field, c.lastChild.textContent]))]))"""
    )
    return found


async def quiet_metrics(http: aiohttp.ClientSession, url: str) -> Exposition:
    """/metrics once the load is over: nothing in flight, tokens and energy no longer moving."""
    previous = None
    for _ in range(60):
        async with http.get(url + "/metrics") as r:
            now = Exposition(await r.text())
        figures = (now.tokens(), now.sum("meterproxy_energy_joules_total"))
        if now.sum("meterproxy_inflight_requests") == 0 and figures == previous:
            return now
        previous = figures
        await asyncio.sleep(0.5)
    raise AssertionError("the proxy never went quiet after the load stopped")


@pytest.mark.slow
async def test_status_page_renders_updates_and_agrees_with_metrics(tmp_path: Path) -> None:
    chromium_or_skip()
    fake = FakeUpstream("vllm", dict(demo.MODELS), keep_seen=False)
    runner = web.AppRunner(fake.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    tree: dict[str, Any] = demo.demo_tree(upstream_url, tmp_path, 0, "127.0.0.1")
    tree["auth"] = {"admin_keys": ["env:ADMIN_KEY"]}
    tree["ui"] = {"interval_s": 1}
    environ = {
        "DEMO_RESEARCH_KEY": demo.KEYS["research"],
        "DEMO_SUPPORT_KEY": demo.KEYS["support"],
        "ADMIN_KEY": ADMIN_KEY,
    }
    settings = config.parse(tree, environ)
    app = create_app(settings, registry=CollectorRegistry(), tokens=TokenCounter(None))
    proxy = await start(app, "127.0.0.1", 0)
    traffic = asyncio.create_task(demo.load(proxy.url + "/v1", workers=4, stop_after_s=18))
    try:
        async with chromium(tmp_path) as browser, aiohttp.ClientSession() as http:
            # The key rides in the fragment, which never reaches the server (or its logs).
            page = await browser.open(f"{proxy.url}/ui#key={ADMIN_KEY}")
            await page.wait_for("Number(document.body.dataset.updates) >= 1")
            assert await page.evaluate("location.hash") == ""
            assert await page.evaluate("document.getElementById('login').style.display") == "none"

            # It keeps updating while the load runs: new data, more tokens.
            def total_tokens(rows: dict[str, dict[str, str]]) -> float:
                return sum(shown(r["tokens"])[0] for r in rows.values())

            row_key = "row.dataset.model + '@' + row.dataset.upstream"
            await page.wait_for("document.querySelectorAll('#models tbody tr[data-model]').length")
            first_update = await page.evaluate("Number(document.body.dataset.updates)")
            first = total_tokens(await cells(page, "#models tbody tr", row_key))
            await asyncio.sleep(9)
            assert await page.evaluate("Number(document.body.dataset.updates)") >= first_update + 3
            assert total_tokens(await cells(page, "#models tbody tr", row_key)) > first
            assert await page.evaluate("document.querySelectorAll('#chart-tps path').length") == 2
            ARTIFACTS.mkdir(exist_ok=True)
            shot = await page.screenshot(ARTIFACTS / "ui-status.png")
            print(f"\nstatus page screenshot: {shot}")

            # Once the load is over and the figures are still, the page shows what /metrics says.
            await traffic
            metrics = await quiet_metrics(http, proxy.url)
            seen = await page.evaluate("Number(document.body.dataset.updates)")
            await page.wait_for(f"Number(document.body.dataset.updates) >= {seen + 2}")
            models = await cells(page, "#models tbody tr", row_key)
            tenants = await cells(page, ".tenant", "row.dataset.tenant")
            upstreams = await cells(page, "#upstreams tbody tr", "row.dataset.upstream")
            # The demo's tasks have closed into the task counters: the page lists them.
            task_rows = await page.evaluate(
                "[...document.querySelectorAll('#tasks tr[data-task]')].map((r) => "
                "[r.dataset.task, r.children[1].textContent])"
            )
            quotas = await page.evaluate(
                """[...document.querySelectorAll(".tenant [data-limit]")].map((m) => [
                    m.closest(".tenant").dataset.tenant, m.dataset.limit,
                    m.querySelector("[data-field=quota]").textContent.split(" · ")[1]])"""
            )
            after = await quiet_metrics(http, proxy.url)
    finally:
        if not traffic.done():
            traffic.cancel()
        await stop(proxy)
        await runner.cleanup()

    assert set(models) == {"llama-3.1-8b@local-vllm", "qwen2.5-7b@local-vllm"}
    for key, row in models.items():
        model, upstream = key.split("@")
        at = {"model": model, "upstream": upstream}
        tokens = metrics.tokens(**at)
        energy = metrics.sum("meterproxy_energy_joules_total", **at)
        cost = metrics.sum("meterproxy_cost_usd_total", **at)
        expected = {
            "requests": metrics.sum("meterproxy_requests_total", **at),
            "tokens": tokens,
            "tokens_per_joule": tokens / energy,
            "joules_per_request": metrics.sum("meterproxy_request_energy_joules_sum", **at)
            / metrics.sum("meterproxy_request_energy_joules_count", **at),
            "usd_per_million_tokens": cost / tokens * 1e6,
            "tokens_per_usd": tokens / cost,
            "ttft_p50_s": metrics.ttft(0.5, **at),
            "ttft_p95_s": metrics.ttft(0.95, **at),
        }
        for field, value in expected.items():
            assert agrees(row[field], value), (key, field, row[field], value)

    overall = metrics.tokens() / metrics.sum("meterproxy_energy_joules_total")
    assert 0.5 <= overall <= 20  # 8B-class models on a modern GPU, lightly loaded

    assert set(tenants) >= {"research", "support"}
    for tenant in ("research", "support"):
        row, at = tenants[tenant], {"tenant": tenant}
        completion = metrics.sum("meterproxy_tokens_total", type="completion", **at)
        assert agrees(row["cost_usd"], metrics.sum("meterproxy_cost_usd_total", **at))
        assert agrees(row["tokens"], metrics.tokens(**at))
        assert agrees(row["requests"], metrics.sum("meterproxy_requests_total", **at))
        wasted = metrics.sum("meterproxy_wasted_tokens_total", **at)
        assert agrees(row["waste_share"], wasted / completion), (tenant, row)
    assert quotas, "the demo's tenants have limits: their usage bars are shown"
    assert {metric for metric, _ in task_rows} == {
        "meterproxy_task_outcomes_total",
        "meterproxy_task_cost_usd_total",
        "meterproxy_task_energy_joules_total",
        "meterproxy_task_tokens_total",
    }
    assert any(
        "result=success" in labels and "tenant=research" in labels for _, labels in task_rows
    )
    for tenant, limit, text in quotas:
        ratio = metrics.sum("meterproxy_quota_usage_ratio", tenant=tenant, limit=limit)
        assert agrees(text, ratio), (tenant, limit, text, ratio)

    # GPU figures keep moving at idle: the page's lie between the /metrics read before and after.
    (gpu,) = upstreams.values()
    power = sorted(m.sum("meterproxy_gpu_power_watts") for m in (metrics, after))
    value, half = shown(gpu["power_w"])
    assert power[0] * 0.95 - half <= value <= power[1] * 1.05 + half
    idle = sorted(
        m.sum("meterproxy_gpu_idle_energy_joules_total")
        / m.sum("meterproxy_gpu_energy_joules_total")
        for m in (metrics, after)
    )
    assert idle[0] - 0.01 <= shown(gpu["idle_share"])[0] <= idle[1] + 0.01
