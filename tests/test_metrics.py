"""The metric catalogue: a settled request's series, written the way the library would."""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meterproxy.metrics import LATENCY_BUCKETS, Metrics
from meterproxy.settlement import Settlement
from meterproxy.usage import Source, Usage

from .factories import settlement


def _by_the_library(m: Metrics, s: Settlement) -> None:
    """What `Metrics.observe` must amount to, through prometheus_client's public calls only.
    A request's series are all labelled when its label set is first seen (zeros show)."""
    u = s.usage
    tokens = m.tokens
    for kind in ("prompt", "completion", "cached_prompt", "reasoning"):
        tokens.labels(s.model, s.upstream, s.tenant, kind)
    m.estimates.labels(s.model)
    m.cost.labels(s.model, s.upstream, s.tenant)
    m.unpriced.labels(s.model)
    for histogram in (m.duration, m.ttft, m.tpot):
        histogram.labels(s.model, s.upstream)
    for kind, value in (
        ("prompt", u.prompt),
        ("completion", u.completion),
        ("cached_prompt", u.cached_prompt),
        ("reasoning", u.reasoning),
    ):
        if value:
            tokens.labels(s.model, s.upstream, s.tenant, kind).inc(value)
    m.requests.labels(s.endpoint, s.model, s.upstream, s.tenant, s.status).inc()
    if s.estimated:
        m.estimates.labels(s.model).inc()
    if s.waste_reason is not None and u.completion:
        m.wasted.labels(s.model, s.tenant, s.waste_reason).inc(u.completion)
    if s.upstream_error is not None:
        m.upstream_errors.labels(s.upstream, s.upstream_error).inc()
    if s.reached_upstream:
        m.cost.labels(s.model, s.upstream, s.tenant).inc(s.cost_usd)
        if not s.priced:
            m.unpriced.labels(s.model).inc()
        m.duration.labels(s.model, s.upstream).observe(s.duration_ns / 1e9)
        if s.energy_j is not None:
            m.request_energy.labels(s.model, s.upstream).observe(s.energy_j)
        if s.ttft_ns is not None:
            m.ttft.labels(s.model, s.upstream).observe(s.ttft_ns / 1e9)
        if s.tpot_ns is not None:
            m.tpot.labels(s.model, s.upstream).observe(s.tpot_ns / 1e9)


# Durations on a bucket bound, between bounds, past the last one; every counter touched.
SETTLEMENTS: list[dict[str, Any]] = [
    {},
    {"ended_ns": int(LATENCY_BUCKETS[2] * 1e9)},  # exactly on a bound: counted in it
    {"ended_ns": int(LATENCY_BUCKETS[-1] * 1e9) * 2},  # past the last bound: +Inf
    {
        "usage": Usage(100, 40, 30, 12, Source.UPSTREAM),
        "streamed": True,
        "first_token_ns": 2_000_000,
        "ended_ns": 90_000_000,
        "cost_usd": 0.25,
        "energy_j": 12.5,
        "estimated": True,
        "waste_reason": "truncated",
    },
    {"usage": Usage(0, 0, 0, 0, Source.UPSTREAM), "priced": False, "cost_usd": 0.0},
    {"status": "502", "upstream_error": "connect", "reached_upstream": False},
    {"tenant": "team-b", "model": "other", "ended_ns": 10**6 + 1},
]


@pytest.mark.parametrize("changes", SETTLEMENTS)
def test_observe_writes_what_the_library_would(changes: dict[str, Any]) -> None:
    fast, reference = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    s = settlement(**changes)
    for _ in range(3):  # the series is made once, then reused
        fast.observe(s)
        _by_the_library(reference, s)
    assert generate_latest(fast.registry) == generate_latest(reference.registry)


def test_a_histogram_takes_a_nan_in_its_sum_and_in_no_bucket() -> None:
    m = Metrics(CollectorRegistry())
    m.observe(settlement())  # makes the series
    series = next(iter(m._series.values()))
    series.duration.observe(math.nan)
    child = m.duration.labels("m", "u")
    buckets = [b.get() for b in child._buckets]
    assert sum(buckets) == 1  # the request's own duration; the NaN in none
    assert math.isnan(child._sum.get())


def test_the_series_sum_every_request() -> None:
    m = Metrics(CollectorRegistry())
    for i in range(5):
        m.observe(settlement(usage=Usage(10 + i, 5, None, None, Source.UPSTREAM)))
    prompt = m.registry.get_sample_value(
        "meterproxy_tokens_total",
        {"model": "m", "upstream": "u", "tenant": "anonymous", "type": "prompt"},
    )
    requests = m.registry.get_sample_value(
        "meterproxy_requests_total",
        {
            "endpoint": "chat_completions",
            "model": "m",
            "upstream": "u",
            "tenant": "anonymous",
            "status": "200",
        },
    )
    assert (prompt, requests) == (10 + 11 + 12 + 13 + 14, 5)
