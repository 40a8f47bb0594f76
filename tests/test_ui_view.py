"""What the status page and the terminal summary show, from a real registry fed the way the
proxy feeds it: settled records through Metrics.observe, energy and power as the tracker sets
them, quota ratios as settlement sets them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from meterproxy import config
from meterproxy.metrics import Metrics
from meterproxy.ui import terminal
from meterproxy.ui.history import History, take
from meterproxy.ui.view import build

from .test_ui_history import samples, settled

TENANTS = config.parse(
    {
        "upstreams": [{"name": "gpu-box", "url": "http://127.0.0.1:1/v1", "gpus": [0]}],
        "auth": {"mode": "open"},
        "tenants": {
            "research": {"limits": {"tokens_per_day": 1000, "usd_per_month": 10}},
            "support": {},
        },
    },
    {},
).tenancy.tenants


def test_figures_over_the_window_and_the_last_minute() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    ring = History(history_s=600, interval_s=10)
    ring.add(take(samples(registry), 1000.0))
    # Minute one: research asks llama twice.
    for ttft_ms in (40, 80):
        metrics.observe(
            settled(
                "llama",
                "research",
                100,
                50,
                first_token_ns=ttft_ms * 10**6,
                cost_usd=0.003,
                energy_j=30.0,
                streamed=True,
            )
        )
    metrics.energy.labels("llama", "gpu-box", "research").inc(60.0)
    metrics.gpu_energy.labels("0").inc(200.0)
    metrics.gpu_idle_energy.labels("0").inc(50.0)
    metrics.gpu_power.labels("0").set(350.0)
    ring.add(take(samples(registry), 1060.0))
    # Minute two: support's answer is truncated; research's quota gauge moves.
    metrics.observe(
        settled("qwen", "support", 20, 64, waste_reason="truncated", cost_usd=0.001, energy_j=8.0)
    )
    metrics.energy.labels("qwen", "gpu-box", "support").inc(8.0)
    metrics.quota_usage_ratio.labels("research", "tokens_per_day").set(0.3)
    metrics.quota_rejections.labels("support", "requests_per_minute").inc(2)
    metrics.gpu_power.labels("0").set(410.0)
    ring.add(take(samples(registry), 1120.0))
    now = take(samples(registry), 1125.0)

    view = build(ring, now, TENANTS, {"gpu-box": ["0"]})
    assert view["window_s"] == 125.0 and view["interval_s"] == 10

    llama, qwen = view["models"]
    assert (llama["model"], llama["upstream"], llama["requests"]) == ("llama", "gpu-box", 2)
    assert llama["tokens"] == 300 and llama["energy_j"] == 60
    assert llama["tokens_per_joule"] == 300 / 60
    assert llama["joules_per_request"] == 30
    assert llama["cost_usd"] == 0.006
    assert llama["usd_per_million_tokens"] == 0.006 / 300 * 1e6
    assert llama["tokens_per_usd"] == 300 / 0.006
    assert llama["tokens_per_s"] == 0  # nothing from llama in the last minute
    # TTFT 40 ms and 80 ms fall in the 25-50 ms and 50-100 ms buckets
    assert llama["ttft_p50_s"] == 0.05 and 0.05 < (llama["ttft_p95_s"] or 0) <= 0.1
    assert qwen["tokens"] == 84 and qwen["tokens_per_s"] == 84 / 65

    (box,) = view["upstreams"]
    assert box == {
        "upstream": "gpu-box",
        "gpus": ["0"],
        "power_w": 410.0,
        "idle_share": 0.25,
        "inflight": 0,
    }

    research, support = view["tenants"]
    assert research["tenant"] == "research" and research["cost_usd"] == 0.006
    assert research["waste_share"] == 0 and research["waste"] == {}
    (quota,) = research["quotas"]
    assert quota == {
        "limit": "tokens_per_day",
        "unit": "tokens today",
        "value": 1000.0,
        "used": 300.0,
        "ratio": 0.3,
    }
    assert support["waste"] == {"truncated": 64} and support["waste_share"] == 1.0
    assert support["rejections"] == {"requests_per_minute": 2}
    assert view["tasks"] is None

    recent = view["recent"]  # since the snapshot at 1060: support's request only
    assert recent["window_s"] == 65
    assert recent["tokens_per_s"] == 84 / 65
    assert recent["tokens_per_joule"] == 84 / 8
    assert recent["power_w"] == 410 and recent["waste_share"] == 1.0

    series = view["series"]
    assert series["t"] == [1060.0, 1120.0]
    assert series["tokens_per_s"] == {"llama": [300 / 60, 0.0], "qwen": [0.0, 84 / 60]}
    assert series["power_w"] == {"0": [350.0, 410.0]}
    # ratios over a trailing 30 s = 3 steps of 10 s: here, both steps
    assert series["tokens_per_joule"] == [300 / 60, 384 / 68]


def test_the_terminal_summary_reads_the_same_view() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    ring = History(history_s=600, interval_s=2)
    ring.add(take(samples(registry), 0.0))
    metrics.observe(settled("llama", "research", 900, 100, cost_usd=0.0021))
    metrics.observe(settled("qwen", "support", 20, 80, waste_reason="truncated", cost_usd=0.0004))
    metrics.observe(settled("qwen", "support", 20, 20, waste_reason="client_disconnect"))
    metrics.energy.labels("llama", "gpu-box", "research").inc(250.0)
    metrics.gpu_power.labels("0").set(402.0)
    metrics.quota_rejections.labels("support", "requests_per_minute").inc(3)
    view = build(ring, take(samples(registry), 38.0), TENANTS, {"gpu-box": ["0"]})

    lines = terminal.summary(view).splitlines()
    # 1,140 tokens in 38 s, on 250 J, for $0.0025
    assert lines[0].endswith(
        "30 tokens/s · 4.56 tokens/J · $2.19 per M tokens · GPU 402 W  (last 38 s)"
    )
    assert lines[1] == "  research  $0.0021 spent · 0.0% wasted"
    assert lines[2] == (
        "  support   $0.0004 spent · 100.0% wasted (truncated 80.0%, client_disconnect 20.0%)"
        " · 3 refused (requests_per_minute)"
    )
    assert len(lines) == 3


def test_outcome_metrics_fill_the_task_area_once_they_exist() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    ring = History(history_s=60, interval_s=2)
    ring.add(take(samples(registry), 0.0))
    assert build(ring, take(samples(registry), 2.0), TENANTS, {})["tasks"] is None
    # The first task closes (value/meter.py): its counters get their first series.
    metrics.task_outcomes.labels("research", "llama", "success").inc(3)
    view = build(ring, take(samples(registry), 4.0), TENANTS, {})
    assert view["tasks"] == [
        {
            "metric": "meterproxy_task_outcomes_total",
            "labels": "model=llama,result=success,tenant=research",
            "value": 3.0,
        }
    ]
