"""The status page's memory: snapshots of a real registry, their differences, the bounded ring,
and Prometheus's histogram_quantile."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry

from meterproxy.metrics import Metrics
from meterproxy.settlement import Settlement
from meterproxy.ui.history import History, Snapshot, quantile, take
from meterproxy.usage import Source, Usage

from .factories import settlement


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples]


def settled(model: str, tenant: str, prompt: int, completion: int, **fields: Any) -> Settlement:
    values: dict[str, Any] = {"cost_usd": 0.0, **fields}
    return settlement(
        tenant=tenant,
        model=model,
        upstream="gpu-box",
        ended_ns=2_000_000_000,
        usage=Usage(prompt, completion, source=Source.UPSTREAM),
        **values,
    )


def test_a_snapshot_holds_the_registry_figures_and_differences_say_what_happened() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    before = take(samples(registry), 100.0)
    metrics.observe(settled("m", "research", 30, 12, first_token_ns=50_000_000, cost_usd=0.5))
    metrics.observe(settled("m", "support", 10, 64, waste_reason="truncated"))
    metrics.gpu_power.labels("0").set(420.0)
    after = take(samples(registry), 102.5)

    assert after.total("tokens", type="prompt") == registry.get_sample_value(
        "meterproxy_tokens_total",
        {"model": "m", "upstream": "gpu-box", "tenant": "research", "type": "prompt"},
    ) + registry.get_sample_value(
        "meterproxy_tokens_total",
        {"model": "m", "upstream": "gpu-box", "tenant": "support", "type": "prompt"},
    )
    assert after.total("waste", tenant="support", reason="truncated") == 64
    assert after.total("requests", model="m") == 2
    assert after.sums("power", "gpu") == {("0",): 420.0}
    assert after.sums("tokens", "tenant", type="completion") == {
        ("research",): 12,
        ("support",): 64,
    }

    step = after.since(before)
    assert step.t_s == 2.5
    assert step.total("tokens", tenant="research") == 42
    assert step.total("cost") == 0.5
    metrics.observe(settled("m", "research", 5, 5))
    later = take(samples(registry), 103.0).since(after)
    assert later.total("tokens") == 10 and later.total("requests") == 1
    assert later.total("ttft", le="+Inf") == 0  # no first token in that one


def test_task_metrics_pass_through_when_they_exist() -> None:
    snapshot = take(
        [
            ("meterproxy_task_outcomes_total", {"tenant": "research", "outcome": "success"}, 3.0),
            ("meterproxy_task_outcomes_created", {"tenant": "research"}, 1e9),
            ("process_cpu_seconds_total", {}, 12.0),
        ],
        0.0,
    )
    assert snapshot.tasks == {
        ("meterproxy_task_outcomes_total", "outcome=success,tenant=research"): 3.0
    }
    assert not snapshot.counters and not snapshot.gauges


def test_the_ring_is_bounded_and_finds_a_snapshot_by_time() -> None:
    ring = History(history_s=10, interval_s=2)
    for t in range(20):
        ring.add(Snapshot(float(t), {"tokens": {("m", "u", "t", "prompt"): 10.0 * t}}, {}))
    assert len(ring.snapshots) == 6 and ring.snapshots[0].t_s == 14
    assert len(ring.points) == 5
    assert ring.points[-1].tokens == 10 and ring.points[-1].dt_s == 1
    assert ring.points[-1].tokens_by_model == {"m": 10.0}
    found = ring.at_or_before(16.5)
    assert found is not None and found.t_s == 16
    oldest = ring.at_or_before(3)
    assert oldest is not None and oldest.t_s == 14  # older than kept: the oldest kept


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (math.inf, 10.0)]
    assert quantile(0.5, buckets) == 0.1 + 0.4 * (5 - 2) / (6 - 2)
    assert quantile(0.1, buckets) == 0.1 * 1 / 2  # first bucket: from zero
    assert quantile(0.8, buckets) == 1.0
    assert quantile(0.95, buckets) == 1.0  # in +Inf: the highest finite bound
    assert quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert quantile(0.5, []) is None
