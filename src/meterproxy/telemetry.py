"""OpenTelemetry GenAI client metrics, opt-in (`telemetry.otlp_endpoint`): a settlement sink
that records each request the proxy made to an upstream into the instruments the GenAI
semantic conventions define, exported over OTLP/HTTP by the OpenTelemetry SDK. The only
importer of opentelemetry (the `otel` extra). The `meterproxy_*` Prometheus metrics remain the
stable contract: these conventions are still in development and get renamed.

Names, units, attributes and bucket boundaries follow open-telemetry/semantic-conventions-genai
(docs/gen-ai/client-inference.md, gen-ai-token-metrics.md, client-embeddings.md, 2026), where
`gen_ai.client.token.usage` and `gen_ai.client.operation.*` became the `gen_ai.client.inference.*`
counters and histograms below. The proxy is the client of its upstreams here: `server.*` name
the upstream, `gen_ai.request.model` the model it was asked for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from . import __version__
from .config import Telemetry, Upstream
from .endpoints import BY_NAME
from .settlement import Settlement

log = logging.getLogger(__name__)

# ExplicitBucketBoundaries the conventions give for durations and for token counts.
# fmt: off
SECONDS_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)
# fmt: on
# endpoint -> gen_ai.operation.name; other /v1 paths are not operations the conventions name.
UNKNOWN_MODALITY = "unknown"  # OpenAI-style usage does not split tokens by modality
SHUTDOWN_S = 3.0  # per export, retries included, and for the final flush


@dataclass(frozen=True, slots=True)
class Call:
    """What the conventions need from one settled request."""

    operation: str
    model: str
    upstream: str
    error_type: str | None
    duration_s: float
    streamed: bool
    time_to_first_chunk_s: float | None
    time_per_output_chunk_s: float | None
    input_tokens: int | None
    output_tokens: int | None
    cache_read_tokens: int | None
    reasoning_tokens: int | None


def call_of(record: Settlement) -> Call | None:
    """The one place that reads a settled record (None: not a call to an upstream model)."""
    endpoint = BY_NAME.get(record.endpoint)
    operation = endpoint.genai_operation if endpoint is not None else None
    if operation is None or not record.reached_upstream:
        return None
    ttft, tpot, usage = record.ttft_ns, record.tpot_ns, record.usage
    return Call(
        operation=operation,
        model=record.model,
        upstream=record.upstream,
        # the failure table's kind, else the HTTP status (499: the client hung up)
        error_type=record.upstream_error
        or (None if record.status.startswith("2") else record.status),
        duration_s=record.duration_ns / 1e9,
        streamed=record.streamed,
        # to the first chunk with content (vLLM's role-only chunk comes microseconds before)
        time_to_first_chunk_s=None if ttft is None or not record.streamed else ttft / 1e9,
        # vLLM and trtllm send one token per chunk: the mean time per output token after the
        # first is the mean time per chunk. Recorded once per stream, not once per chunk.
        time_per_output_chunk_s=None if tpot is None else tpot / 1e9,
        input_tokens=usage.prompt,
        output_tokens=usage.completion,
        cache_read_tokens=usage.cached_prompt,
        reasoning_tokens=usage.reasoning,
    )


class OtlpMetrics:
    """The sink (`observe`) and its lifetime (`lifetime`, a cleanup_ctx): the SDK's reader
    thread starts with the app and flushes once more when it stops."""

    def __init__(self, settings: Telemetry, upstreams: Callable[[], tuple[Upstream, ...]]) -> None:
        assert settings.otlp_endpoint is not None
        base = settings.otlp_endpoint.rstrip("/")
        self.endpoint = base if base.endswith("/v1/metrics") else base + "/v1/metrics"
        self.interval_s = settings.export_interval_s
        self._upstreams = upstreams
        self._servers: dict[str, dict[str, Any]] = {}
        self._seen: object = None
        self._provider: MeterProvider | None = None
        self._instruments: dict[str, Any] = {}

    def start(self) -> None:
        reader = PeriodicExportingMetricReader(
            # A collector that is down must not hold up a shutdown for long.
            OTLPMetricExporter(endpoint=self.endpoint, timeout=SHUTDOWN_S),
            export_interval_millis=self.interval_s * 1000,
        )
        seconds = ExplicitBucketHistogramAggregation(SECONDS_BUCKETS)
        tokens = ExplicitBucketHistogramAggregation(TOKEN_BUCKETS)
        self._provider = MeterProvider(
            metric_readers=[reader],
            shutdown_on_exit=False,  # the app's cleanup flushes it, off the loop
            resource=Resource.create({"service.name": "meterproxy"}),
            views=[
                View(instrument_name="gen_ai.client.*.duration", aggregation=seconds),
                View(instrument_name="gen_ai.client.inference.time_*", aggregation=seconds),
                View(instrument_name="gen_ai.client.*.operation.*", aggregation=tokens),
            ],
        )
        meter = self._provider.get_meter("meterproxy", __version__)
        histogram, counter = meter.create_histogram, meter.create_counter
        self._instruments = {
            "inference.duration": histogram(
                "gen_ai.client.inference.duration", "s", "GenAI client inference duration."
            ),
            "time_to_first_chunk": histogram(
                "gen_ai.client.inference.time_to_first_chunk",
                "s",
                "Time to receive the first chunk of a streamed response.",
            ),
            "time_per_output_chunk": histogram(
                "gen_ai.client.inference.time_per_output_chunk",
                "s",
                "Time per output chunk after the first (a stream's mean).",
            ),
            "usage.input": counter(
                "gen_ai.client.inference.usage.input_tokens", "{token}", "Input tokens used."
            ),
            "usage.output": counter(
                "gen_ai.client.inference.usage.output_tokens", "{token}", "Output tokens used."
            ),
            "usage.cache_read": counter(
                "gen_ai.client.inference.usage.cache_read.input_tokens",
                "{token}",
                "Input tokens served from a provider-managed cache.",
            ),
            "usage.reasoning": counter(
                "gen_ai.client.inference.usage.reasoning.output_tokens",
                "{token}",
                "Output tokens used for reasoning.",
            ),
            "operation.input": histogram(
                "gen_ai.client.inference.operation.input_tokens",
                "{token}",
                "Input tokens per inference operation.",
            ),
            "operation.output": histogram(
                "gen_ai.client.inference.operation.output_tokens",
                "{token}",
                "Output tokens per inference operation.",
            ),
            "embeddings.duration": histogram(
                "gen_ai.client.embeddings.duration", "s", "GenAI client embeddings duration."
            ),
            "embeddings.input": histogram(
                "gen_ai.client.embeddings.operation.input_tokens",
                "{token}",
                "Input tokens per embeddings operation.",
            ),
        }

    def observe(self, record: Settlement) -> None:
        call = call_of(record)
        if call is None or self._provider is None:
            return
        base = {
            "gen_ai.operation.name": call.operation,
            "gen_ai.request.model": call.model,
            **self._server(call.upstream),
        }
        failed = {**base, "error.type": call.error_type} if call.error_type else base
        i = self._instruments
        if call.operation == "embeddings":
            i["embeddings.duration"].record(call.duration_s, failed)
            i["embeddings.input"].record(call.input_tokens or 0, failed)
            return
        i["inference.duration"].record(call.duration_s, failed)
        if call.streamed and call.time_to_first_chunk_s is not None:
            i["time_to_first_chunk"].record(call.time_to_first_chunk_s, base)
        if call.streamed and call.time_per_output_chunk_s is not None:
            i["time_per_output_chunk"].record(call.time_per_output_chunk_s, base)
        # Every operation counts, failed ones too: 0 when the upstream reported no usage.
        usage = {**base, "gen_ai.token.modality": UNKNOWN_MODALITY}
        i["usage.input"].add(call.input_tokens or 0, usage)
        i["usage.output"].add(call.output_tokens or 0, usage)
        i["usage.cache_read"].add(call.cache_read_tokens or 0, usage)
        i["usage.reasoning"].add(call.reasoning_tokens or 0, usage)
        i["operation.input"].record(call.input_tokens or 0, failed)
        i["operation.output"].record(call.output_tokens or 0, failed)

    def _server(self, upstream: str) -> dict[str, Any]:
        """gen_ai.provider.name and server.* of an upstream, from the current config."""
        upstreams = self._upstreams()
        if upstreams is not self._seen:  # a reload swapped the config: rebuild once
            self._seen, self._servers = upstreams, {}
            for u in upstreams:
                parts = urlsplit(u.url)
                port = parts.port or (443 if parts.scheme == "https" else 80)
                self._servers[u.name] = {
                    "gen_ai.provider.name": u.kind,
                    "server.address": parts.hostname or "",
                    "server.port": port,
                }
        return self._servers.get(upstream, {"gen_ai.provider.name": "generic"})

    def shutdown(self) -> None:
        """Flush what is pending (blocking: call it off the loop)."""
        if self._provider is not None:
            self._provider.shutdown(timeout_millis=SHUTDOWN_S * 1000)
            self._provider = None

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self.start()
        log.info("telemetry: GenAI metrics to %s every %ss", self.endpoint, self.interval_s)
        yield
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)
