"""Engine reconciliation: the engine's own token counters beside the proxy's.

For upstreams whose engine exposes Prometheus counters (vLLM: `vllm:prompt_tokens_total`,
`vllm:generation_tokens_total`, `vllm:request_success_total`; trtllm-serve: the same three as
`trtllm_*`), the proxy scrapes them every
`interval_s` and compares what the engine counted with what the proxy metered for that upstream
over the same window. The drift, (engine - proxy) / engine, is exported as
`meterproxy_engine_token_drift_ratio{upstream,type}`: traffic that bypasses the proxy shows as a
positive drift, metering that is off as either sign.

Known offsets, documented rather than hidden: vLLM counts a request's prompt once per choice
(n > 1 runs n engine requests) while the API reports it once; requests in flight at a scrape are
counted by the engine before the proxy settles them (the window smooths it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from .config import Upstream
    from .metrics import Metrics
    from .settlement import Settlement

log = logging.getLogger(__name__)

# Engine kind -> (measure -> the counter family it is read from), and where the engine serves
# them. vLLM: vllm/v1/metrics/loggers.py at /metrics. trtllm-serve (TensorRT-LLM >= 1.1):
# tensorrt_llm/metrics/collector.py's counters, which its OpenAI server mounts at
# /prometheus/metrics (its /metrics is iteration statistics as JSON).
ENGINE_COUNTERS: Mapping[str, Mapping[str, str]] = {
    "vllm": {
        "prompt": "vllm:prompt_tokens_total",
        "completion": "vllm:generation_tokens_total",
        "requests": "vllm:request_success_total",
    },
    "trtllm": {
        "prompt": "trtllm_prompt_tokens_total",
        "completion": "trtllm_generation_tokens_total",
        "requests": "trtllm_request_success_total",
    },
}
ENGINE_METRICS_PATH: Mapping[str, str] = {"vllm": "/metrics", "trtllm": "/prometheus/metrics"}
MEASURES = ("prompt", "completion", "requests")
_SAMPLE = re.compile(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.MULTILINE)


def parse_counters(text: bytes, families: Mapping[str, str]) -> dict[str, float] | None:
    """Each measure's total over all label sets, from Prometheus text; None if a family is
    missing (not this engine, or metrics switched off)."""
    wanted = {name: measure for measure, name in families.items()}
    totals: dict[str, float] = {}
    for match in _SAMPLE.finditer(text):
        measure = wanted.get(match.group(1).decode())
        if measure is not None:
            try:
                totals[measure] = totals.get(measure, 0.0) + float(match.group(3))
            except ValueError:
                continue
    return totals if len(totals) == len(families) else None


@dataclass(frozen=True)
class Point:
    t_s: float
    engine: Mapping[str, float]
    proxy: Mapping[str, float]


def drift(old: Point, new: Point) -> dict[str, float]:
    """(engine - proxy) / engine over the window between two points, per measure; 0 when the
    engine did nothing (an engine restart, which resets its counters, also reads as nothing)."""
    out: dict[str, float] = {}
    for measure in MEASURES:
        engine = new.engine[measure] - old.engine[measure]
        proxy = new.proxy.get(measure, 0.0) - old.proxy.get(measure, 0.0)
        out[measure] = (engine - proxy) / engine if engine > 0 else 0.0
    return out


class Reconciler:
    """A settlement sink (the proxy's totals per upstream) and one scraping task."""

    def __init__(
        self,
        upstreams: Callable[[], tuple[Upstream, ...]],
        metrics: Metrics,
        clock_s: Callable[[], float],
        *,
        interval_s: float = 15.0,
        window_s: float = 300.0,
    ) -> None:
        self._upstreams = upstreams
        self._metrics = metrics
        self._clock_s = clock_s
        self.interval_s = interval_s
        self._window_s = window_s
        self._proxy: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self._points: dict[str, collections.deque[Point]] = collections.defaultdict(
            collections.deque
        )
        self._up: dict[str, bool] = {}

    def observe(self, settlement: Settlement) -> None:
        """Settlement sink: what the proxy metered for each upstream's engine."""
        if not settlement.reached_upstream:
            return
        totals = self._proxy[settlement.upstream]
        usage = settlement.usage
        totals["prompt"] = totals.get("prompt", 0.0) + (usage.prompt or 0)
        totals["completion"] = totals.get("completion", 0.0) + (usage.completion or 0)
        totals["requests"] = totals.get("requests", 0.0) + 1

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            for upstream in self._upstreams():
                families = ENGINE_COUNTERS.get(upstream.kind)
                if families is not None:
                    await self.scrape(session, upstream, families)
            await asyncio.sleep(self.interval_s)

    async def scrape(
        self, session: aiohttp.ClientSession, upstream: Upstream, families: Mapping[str, str]
    ) -> None:
        url = upstream.metrics_url or engine_metrics_url(upstream.url, upstream.kind)
        totals: dict[str, float] | None = None
        try:
            timeout = aiohttp.ClientTimeout(total=min(self.interval_s, 10.0))
            async with session.get(url, timeout=timeout, allow_redirects=False) as response:
                if response.status == 200:
                    totals = parse_counters(await response.read(), families)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            totals = None
        name = upstream.name
        up = totals is not None
        if self._up.get(name) != up:
            (log.info if up else log.warning)(
                "engine counters of upstream %s at %s: %s",
                name,
                url,
                "reading" if up else "not readable (is the engine's /metrics on?)",
            )
            self._up[name] = up
        self._metrics.engine_metrics_up.labels(name).set(1 if up else 0)
        if totals is None:
            return
        now = self._clock_s()
        points = self._points[name]
        points.append(Point(now, totals, dict(self._proxy[name])))
        while len(points) > 2 and now - points[1].t_s >= self._window_s:
            points.popleft()
        if len(points) >= 2:
            for measure, ratio in drift(points[0], points[-1]).items():
                self._metrics.engine_drift.labels(name, measure).set(ratio)


def engine_metrics_url(base: str, kind: str = "vllm") -> str:
    """An OpenAI base (`http://host:8000/v1`) -> its engine's counters (vLLM:
    `http://host:8000/metrics`; trtllm-serve: `http://host:8000/prometheus/metrics`)."""
    root = base[: -len("/v1")] if base.endswith("/v1") else base
    return root + ENGINE_METRICS_PATH.get(kind, "/metrics")
