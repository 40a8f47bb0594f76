"""Engine reconciliation: vLLM's own counters beside the proxy's, parsed and compared."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from meterproxy.reconcile import ENGINE_COUNTERS, Point, drift, engine_metrics_url, parse_counters

from .conftest import Proxy, StartProxy, StartUpstream, Upstream

VLLM_TEXT = b"""# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="a"} 120.0
vllm:prompt_tokens_total{engine="0",model_name="b"} 30.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="a"} 400.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="a"} 3.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="a"} 2.0
vllm:request_success_created{engine="0",finished_reason="stop",model_name="a"} 1.7e9
"""


def test_counters_are_summed_over_their_label_sets() -> None:
    totals = parse_counters(VLLM_TEXT, ENGINE_COUNTERS["vllm"])
    assert totals == {"prompt": 150.0, "completion": 400.0, "requests": 5.0}
    assert parse_counters(b"other_metric 1\n", ENGINE_COUNTERS["vllm"]) is None


def test_drift_is_measured_over_the_window_only() -> None:
    old = Point(0, {"prompt": 1000, "completion": 5000, "requests": 10}, {"prompt": 0})
    new = Point(
        60,
        {"prompt": 1100, "completion": 5400, "requests": 14},
        {"prompt": 100, "completion": 300, "requests": 4},
    )
    assert drift(old, new) == {"prompt": 0.0, "completion": 0.25, "requests": 0.0}
    idle = Point(120, new.engine, new.proxy)
    assert drift(new, idle) == {"prompt": 0.0, "completion": 0.0, "requests": 0.0}


def test_the_engine_metrics_sit_beside_the_openai_base() -> None:
    assert engine_metrics_url("http://gpu:8000/v1") == "http://gpu:8000/metrics"
    assert (
        engine_metrics_url("http://gpu:8000/v1", "trtllm") == "http://gpu:8000/prometheus/metrics"
    )


async def value(proxy: Proxy, name: str, **labels: str) -> float:
    for _ in range(100):
        found = proxy.registry.get_sample_value(name, labels)
        if found is not None:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} {labels} never appeared")


@pytest.mark.parametrize("kind", ["vllm", "trtllm"])
async def test_traffic_that_bypasses_the_proxy_shows_as_drift(
    kind: str, start_upstream: StartUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    up: Upstream = await start_upstream(flavor=kind)
    proxy: Proxy = await start_proxy(
        {
            "upstreams": [{"name": "gpu", "url": up.url, "kind": kind}],
            "reconcile": {"interval_s": 0.1, "window_s": 60},
        }
    )
    body = {"model": "sim-llama", "messages": [{"role": "user", "content": "hi there"}]}
    assert await value(proxy, "meterproxy_engine_metrics_up", upstream="gpu") == 1
    for _ in range(3):
        async with http.post(proxy.base_url + "/chat/completions", json=body) as r:
            assert r.status == 200
    await asyncio.sleep(0.4)
    for measure in ("prompt", "completion", "requests"):
        assert (
            await value(proxy, "meterproxy_engine_token_drift_ratio", upstream="gpu", type=measure)
            == 0
        )
    for _ in range(3):  # straight to the engine: metered by nobody
        async with http.post(up.url + "/chat/completions", json=body) as r:
            assert r.status == 200
    await asyncio.sleep(0.4)
    assert (
        proxy.sample("meterproxy_engine_token_drift_ratio", upstream="gpu", type="completion")
        == 0.5
    )
    assert (
        proxy.sample("meterproxy_engine_token_drift_ratio", upstream="gpu", type="requests") == 0.5
    )
