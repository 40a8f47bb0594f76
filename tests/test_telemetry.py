"""OpenTelemetry GenAI metrics, end to end: the proxy exports over OTLP/HTTP to a receiver
started here (an aiohttp server decoding the protobuf ExportMetricsServiceRequest), with the
names, units, attributes and bucket boundaries of the GenAI semantic conventions, and values
that agree with the Prometheus counters."""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client import CollectorRegistry

from meterproxy import config
from meterproxy.app import create_app, start, stop
from meterproxy.sim.upstream import Behavior
from meterproxy.telemetry import SECONDS_BUCKETS, SHUTDOWN_S, TOKEN_BUCKETS, call_of
from meterproxy.tokens import TokenCounter

from .conftest import StartUpstream
from .factories import settlement

# The conventions' ExplicitBucketBoundaries, as written in client-inference.md and
# gen-ai-token-metrics.md (typed here, not imported, so a drift in either shows).
SPEC_SECONDS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48]
SPEC_SECONDS += [40.96, 81.92]
SPEC_TOKENS = [4**i for i in range(14)]


@dataclass
class Receiver:
    url: str
    requests: list[ExportMetricsServiceRequest] = field(default_factory=list)

    def points(self) -> dict[str, list[tuple[dict[str, Any], Any, Any]]]:
        """metric name -> [(attributes, data point, metric)] of the last export that had it
        (cumulative temporality: the last export holds the totals)."""
        found: dict[str, list[tuple[dict[str, Any], Any, Any]]] = {}
        for request in self.requests:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        kind = metric.WhichOneof("data")
                        data = getattr(metric, kind)
                        found[metric.name] = [
                            (attributes(p.attributes), p, metric) for p in data.data_points
                        ]
        return found


def attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        assert isinstance(kv, KeyValue)
        out[kv.key] = getattr(kv.value, kv.value.WhichOneof("value"))
    return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    got: list[ExportMetricsServiceRequest] = []

    async def export(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportMetricsServiceRequest()
        message.ParseFromString(body)
        got.append(message)
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/metrics", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield Receiver(f"http://127.0.0.1:{runner.addresses[0][1]}", got)
    await runner.cleanup()


async def test_genai_metrics_reach_an_otlp_receiver(
    receiver: Receiver, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await start_upstream(
        {
            "sim-llama": Behavior(tokens=12, cached_tokens=3, reasoning_tokens=4),
            "sim-broken": Behavior(failure="http_500_html"),
        }
    )
    tree = {
        "server": {"unready_delay_s": 0, "drain_timeout_s": 5},
        "upstreams": [{"name": "local", "url": up.url, "kind": "vllm"}],
        "ledger": {"enabled": False},
        "quota": {"state_path": str(tmp_path / "quota.db")},
        "telemetry": {"otlp_endpoint": receiver.url, "export_interval_s": 0.2},
    }
    registry = CollectorRegistry()
    app = create_app(config.parse(tree, {}), registry=registry, tokens=TokenCounter(None))
    proxy = await start(app, "127.0.0.1", 0)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    try:
        messages: Any = [{"role": "user", "content": "Hello there"}]
        await client.chat.completions.create(model="sim-llama", messages=messages)
        stream = await client.chat.completions.create(
            model="sim-llama", messages=messages, stream=True
        )
        async for _ in stream:
            pass
        await client.completions.create(model="sim-llama", prompt="Once upon a time")
        embedding = await client.embeddings.create(model="sim-llama", input=["one", "two three"])
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="sim-broken", messages=messages)
        for _ in range(50):  # exported while running, every export_interval_s
            if "gen_ai.client.inference.duration" in receiver.points():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no periodic export reached the receiver")
    finally:
        await client.close()
        await stop(proxy)  # the last export happens here

    def prometheus(name: str, **labels: str) -> float:
        return sum(
            s.value
            for metric in registry.collect()
            for s in metric.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    points = receiver.points()
    (resource,) = receiver.requests[-1].resource_metrics
    assert attributes(resource.resource.attributes)["service.name"] == "meterproxy"
    server = {"server.address": "127.0.0.1", "server.port": urlsplit(up.url).port}
    chat = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": "sim-llama",
        **server,
    }

    duration = key_by_attributes(points["gen_ai.client.inference.duration"])
    ok, metric = duration[key(chat)]
    assert metric.unit == "s" and ok.count == 2
    assert list(ok.explicit_bounds) == SPEC_SECONDS == list(SECONDS_BUCKETS)
    cumulative = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    assert metric.histogram.aggregation_temporality == cumulative
    # error.type: the kind the proxy's failure table gave it (as in meterproxy_upstream_errors)
    (kind,) = {
        s.labels["kind"]
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "meterproxy_upstream_errors_total"
    }
    failed = {**chat, "gen_ai.request.model": "sim-broken", "error.type": kind}
    assert duration[key(failed)][0].count == 1
    text = {**chat, "gen_ai.operation.name": "text_completion"}
    assert duration[key(text)][0].count == 1

    # Streamed only, with the inference attributes (no error.type).
    (first,) = points["gen_ai.client.inference.time_to_first_chunk"]
    assert first[0] == chat and first[1].count == 1 and first[2].unit == "s"
    assert list(first[1].explicit_bounds) == SPEC_SECONDS
    (per_chunk,) = points["gen_ai.client.inference.time_per_output_chunk"]
    assert per_chunk[0] == chat and per_chunk[1].count == 1

    # Usage counters: every inference operation, the same totals as the Prometheus counters
    # (which also hold the embeddings call's input tokens, as its answer reports them).
    embedded = embedding.usage.prompt_tokens
    assert embedded > 0
    usage = {**chat, "gen_ai.token.modality": "unknown"}
    for name, kind, minus in (
        ("gen_ai.client.inference.usage.input_tokens", "prompt", embedded),
        ("gen_ai.client.inference.usage.output_tokens", "completion", 0),
        ("gen_ai.client.inference.usage.cache_read.input_tokens", "cached_prompt", 0),
        ("gen_ai.client.inference.usage.reasoning.output_tokens", "reasoning", 0),
    ):
        assert points[name][0][2].unit == "{token}" and points[name][0][2].sum.is_monotonic
        by_op = {
            a["gen_ai.operation.name"]: p.as_int
            for a, p, _ in points[name]
            if a["gen_ai.request.model"] == "sim-llama"
        }
        assert set(by_op) == {"chat", "text_completion"}
        assert all(
            a
            == {
                **usage,
                "gen_ai.operation.name": a["gen_ai.operation.name"],
                "gen_ai.request.model": a["gen_ai.request.model"],
            }
            for a, _, _ in points[name]
        )
        expected = prometheus("meterproxy_tokens_total", model="sim-llama", type=kind) - minus
        assert 0 < sum(by_op.values()) == expected, (name, by_op, expected)

    per_op = key_by_attributes(points["gen_ai.client.inference.operation.output_tokens"])
    assert list(per_op[key(chat)][0].explicit_bounds) == SPEC_TOKENS == list(TOKEN_BUCKETS)
    assert per_op[key(chat)][0].sum == 2 * 12  # two chat answers of 12 tokens
    assert per_op[key(failed)][0].sum == 0  # failed operations count too, with 0

    (embeddings,) = points["gen_ai.client.embeddings.operation.input_tokens"]
    assert embeddings[0] == {**chat, "gen_ai.operation.name": "embeddings"}
    assert embeddings[1].sum == embedded and embeddings[1].count == 1
    assert list(embeddings[1].explicit_bounds) == SPEC_TOKENS
    assert points["gen_ai.client.embeddings.duration"][0][1].count == 1


def key(attrs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(attrs.items()))


def key_by_attributes(
    found: list[tuple[dict[str, Any], Any, Any]],
) -> dict[tuple[tuple[str, Any], ...], tuple[Any, Any]]:
    return {key(a): (p, m) for a, p, m in found}


def test_only_calls_to_an_upstream_model_are_recorded() -> None:
    record = settlement(reached_upstream=False)
    assert call_of(record) is None  # refused before reaching an upstream
    record = settlement(reached_upstream=True)
    assert call_of(record) is not None
    record = settlement(reached_upstream=True, endpoint="other")
    assert call_of(record) is None  # a /v1 path the conventions do not name


async def test_a_collector_that_is_down_costs_no_request_and_no_long_shutdown(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await start_upstream()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    tree = {
        "server": {"unready_delay_s": 0, "drain_timeout_s": 5},
        "upstreams": [{"name": "local", "url": up.url, "kind": "vllm"}],
        "ledger": {"enabled": False},
        "quota": {"state_path": str(tmp_path / "quota.db")},
        "telemetry": {"otlp_endpoint": dead, "export_interval_s": 0.2},
    }
    proxy = await start(
        create_app(config.parse(tree, {}), registry=CollectorRegistry()), "127.0.0.1", 0
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    try:
        for _ in range(3):
            answer = await client.chat.completions.create(
                model="sim-llama", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.usage is not None and answer.usage.completion_tokens == 8
            await asyncio.sleep(0.3)  # exports fail and retry meanwhile, on their own thread
    finally:
        await client.close()
        started = time.monotonic()
        await stop(proxy)
    assert time.monotonic() - started < 2 * SHUTDOWN_S + 1
