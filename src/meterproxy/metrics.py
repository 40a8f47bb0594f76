"""The metric catalogue, on an injected registry; the only importer of prometheus_client.

Label values come from configuration, upstream model lists and fixed enums only. A settled
request is observed here once, in `observe`, with seconds converted from nanoseconds here.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .settlement import Settlement

CONTENT_TYPE = CONTENT_TYPE_LATEST
# `*_created` series double the exposition and no dashboard or alert reads them. (The library's
# switch is process-wide; this module is its only importer.)
disable_created_metrics()  # type: ignore[no-untyped-call]

# Milliseconds to minutes: relayed TTFT is ~1 ms on a warm local engine, generations run minutes.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# Time per output token: sub-millisecond (speculative decoding) to a crawling second.
TPOT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
# Joules per request: a short chat on a shared GPU (~1 J) to minutes of generation (~100 kJ).
JOULE_BUCKETS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)


def process_died(metrics_dir: str, pid: int) -> None:
    """A worker of `serve --workers` exited: drop its live gauges (in flight, backend up). Its
    counters and histograms stay in the shared files, so the host's totals never go back."""
    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


class Metrics:
    content_type = CONTENT_TYPE

    def __init__(self, registry: CollectorRegistry, multiprocess_dir: str | None = None) -> None:
        """`multiprocess_dir`: this process is one of `serve --workers`; its values live in the
        host's shared files, and `registry` (what /metrics, /ui and tests read) collects every
        process's files: the whole host."""
        self.registry = registry
        self.multiprocess = multiprocess_dir is not None
        self._tracked: list[tuple[Gauge, Callable[[], float]]] = []
        if multiprocess_dir is not None:
            if values.ValueClass.__name__ != "MmapedValue":
                raise RuntimeError(
                    "PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported"
                )
            multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            registry = CollectorRegistry(auto_describe=False)  # declarations only
        # Label children resolved once per label set: labels() costs microseconds per call.
        self._series: dict[tuple[str, str, str, str, str], _Series] = {}
        self._inflight: dict[str, InFlight] = {}
        self._energy: dict[tuple[str, str], Histogram] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "meterproxy_requests",
            "Requests settled, by outcome status.",
            ["endpoint", "model", "upstream", "tenant", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "meterproxy_tokens",
            "Tokens metered (upstream usage, else estimated).",
            ["model", "upstream", "tenant", "type"],
            registry=registry,
        )
        self.duration = Histogram(
            "meterproxy_request_duration_seconds",
            "End-to-end request duration.",
            ["model", "upstream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "meterproxy_time_to_first_token_seconds",
            "Time from request arrival to the first chunk carrying content.",
            ["model", "upstream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "meterproxy_time_per_output_token_seconds",
            "(end - first token) / (completion tokens - 1), streamed requests.",
            ["model", "upstream"],
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge(
            "meterproxy_inflight_requests",
            "Requests being relayed now.",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.wasted = Counter(
            "meterproxy_wasted_tokens",
            "Completion tokens generated but not of use, by reason.",
            ["model", "tenant", "reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "meterproxy_upstream_errors",
            "Upstream failures, by kind.",
            ["upstream", "kind"],
            registry=registry,
        )
        self.upstream_retries = Counter(
            "meterproxy_upstream_retries",
            "Requests sent again because a pooled connection had been closed by the upstream "
            "before it answered (no live server read them).",
            ["upstream"],
            registry=registry,
        )
        self.estimates = Counter(
            "meterproxy_token_estimates",
            "Requests whose tokens were counted by the proxy.",
            ["model"],
            registry=registry,
        )
        self.cost = Counter(
            "meterproxy_cost_usd",
            "Cost of requests in USD (price table, or GPU time + power).",
            ["model", "upstream", "tenant"],
            registry=registry,
        )
        self.unpriced = Counter(
            "meterproxy_unpriced_requests",
            "Requests whose model/upstream has no price (cost 0).",
            ["model"],
            registry=registry,
        )
        self.ledger_errors = Counter(
            "meterproxy_ledger_errors",
            "Usage-ledger failures: `write` (rows kept, retried), `spill` (the local spill "
            "file failed; rows kept in memory), `dropped` (lost: queue and spill full) or "
            "`invalid_row` (a row that could not be stored).",
            ["kind"],
            registry=registry,
        )
        self.ledger_queued = Gauge(
            "meterproxy_ledger_queued_rows",
            "Ledger rows not yet in the ledger: in memory (`memory`) or in the spill file "
            "(`spill`).",
            ["place"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.ledger_backlog_age = Gauge(
            "meterproxy_ledger_backlog_age_seconds",
            "Age of the oldest ledger row not yet in the ledger (0 when none waits).",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.ledger_spilled = Counter(
            "meterproxy_ledger_spilled_rows",
            "Ledger rows moved to the local spill file because the queue was full.",
            registry=registry,
        )
        self.export_events = Counter(
            "meterproxy_export_events",
            "CloudEvents export, per event: `sent` (a 2xx answer), `failed` (sent again later), "
            "`rejected` (refused for its content) or `dropped` (lost: the spill file failed).",
            ["result"],
            registry=registry,
        )
        self.export_queued = Gauge(
            "meterproxy_export_queued_events",
            "CloudEvents waiting to be exported, in memory or in the export's spill file.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.quota_rejections = Counter(
            "meterproxy_quota_rejections",
            "Requests refused by a tenant limit.",
            ["tenant", "limit"],
            registry=registry,
        )
        self.quota_usage_ratio = Gauge(
            "meterproxy_quota_usage_ratio",
            "Used / limit, per tenant and limit.",
            ["tenant", "limit"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.config_reloads = Counter(
            "meterproxy_config_reloads",
            "Configuration reloads, by result (ok, error).",
            ["result"],
            registry=registry,
        )
        self.energy = Counter(
            "meterproxy_energy_joules",
            "GPU energy attributed to requests, interval by interval.",
            ["model", "upstream", "tenant"],
            registry=registry,
        )
        self.gpu_energy = Counter(
            "meterproxy_gpu_energy_joules", "GPU energy measured.", ["gpu"], registry=registry
        )
        self.gpu_idle_energy = Counter(
            "meterproxy_gpu_idle_energy_joules",
            "Measured GPU energy with nothing in flight.",
            ["gpu"],
            registry=registry,
        )
        self.gpu_power = Gauge(
            "meterproxy_gpu_power_watts",
            "GPU power over the last sampling interval.",
            ["gpu"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.energy_gaps = Counter(
            "meterproxy_gpu_energy_gaps",
            "Sampling intervals dropped: the counter went backwards (driver reload).",
            ["gpu"],
            registry=registry,
        )
        self.energy_clamped = Counter(
            "meterproxy_gpu_energy_clamped",
            "Readings above 1.3x the board power limit, clamped.",
            ["gpu"],
            registry=registry,
        )
        self.energy_source_up = Gauge(
            "meterproxy_energy_source_up",
            "1 while the energy source answers.",
            ["source"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        # Each GPU's fitted energy model (energy/calibration.py); `term` is one of idle_w and
        # floor_w (watts), step_j (J per engine step), prefill_j and decode_j (J per token),
        # context_j (J per decoded token per 1000 tokens of context).
        self.energy_model = Gauge(
            "meterproxy_gpu_energy_model",
            "The GPU's fitted energy model, term by term (units in the term's name).",
            ["gpu", "term"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.energy_model_error = Gauge(
            "meterproxy_gpu_energy_model_error_ratio",
            "Out-of-sample error of the fitted model: mean |residual| / mean window energy.",
            ["gpu"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.energy_model_trusted = Gauge(
            "meterproxy_gpu_energy_model_trusted",
            "1 once the fit is backed by data (10 busy windows predicted within 15 %).",
            ["gpu"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.energy_model_in_use = Gauge(
            "meterproxy_gpu_energy_model_in_use",
            "1 while attribution uses the fitted model (from the first busy window, unless it "
            "predicts badly), 0 while it uses the configured defaults.",
            ["gpu"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.energy_model_windows = Gauge(
            "meterproxy_gpu_energy_model_windows",
            "Busy windows (about 1 s each) in the fit, with older ones decayed.",
            ["gpu"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.request_energy = Histogram(
            "meterproxy_request_energy_joules",
            "Attributed GPU energy per request.",
            ["model", "upstream"],
            buckets=JOULE_BUCKETS,
            registry=registry,
        )
        self.connections_refused = Counter(
            "meterproxy_client_connections_closed",
            "Client connections the proxy closed itself: over server.max_connections "
            "(`limit`) or no request head within server.timeouts.headers_s (`head_timeout`).",
            ["reason"],
            registry=registry,
        )
        self.background_crashes = Counter(
            "meterproxy_background_task_crashes",
            "Background tasks (ledger writer, quota store, ...) that crashed and were restarted.",
            ["task"],
            registry=registry,
        )
        self.engine_drift = Gauge(
            "meterproxy_engine_token_drift_ratio",
            "(engine - proxy) / engine over the reconciliation window, from the engine's own "
            "counters: traffic that bypasses the proxy is positive.",
            ["upstream", "type"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.engine_metrics_up = Gauge(
            "meterproxy_engine_metrics_up",
            "1 while the upstream engine's own counters can be read.",
            ["upstream"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        # Value, not volume (value/): a task is counted once, when it closes; its figures
        # are those of all its attempts, failed and unrated ones included. `model` is the
        # model that served most of the task's tokens.
        task_labels = ["tenant", "model", "result"]
        self.task_outcomes = Counter(
            "meterproxy_task_outcomes",
            "Tasks closed, by result: success or failure as last reported, unknown if none was.",
            task_labels,
            registry=registry,
        )
        self.task_cost = Counter(
            "meterproxy_task_cost_usd",
            "Cost of every request of the closed tasks (failed and retried attempts included), "
            "by the task's result.",
            task_labels,
            registry=registry,
        )
        self.task_energy = Counter(
            "meterproxy_task_energy_joules",
            "Attributed GPU energy of every request of the closed tasks, by the task's result.",
            task_labels,
            registry=registry,
        )
        self.task_tokens = Counter(
            "meterproxy_task_tokens",
            "Prompt + completion tokens of every request of the closed tasks, by their result.",
            task_labels,
            registry=registry,
        )
        self.duplicates = Counter(
            "meterproxy_duplicate_requests",
            "Requests repeating one the same tenant sent within value.duplicate_window_s (a "
            "salted hash of the normalized request, never its text).",
            ["tenant", "model"],
            registry=registry,
        )
        self.feedback = Counter(
            "meterproxy_feedback_reports",
            "Outcome reports accepted, by reported result (every report; a task is counted once "
            "in meterproxy_task_outcomes_total).",
            ["tenant", "result"],
            registry=registry,
        )
        self.metering_errors = Counter(
            "meterproxy_metering_errors",
            "Failures inside metering (requests still served).",
            registry=registry,
        )
        self.quota_backend_up = Gauge(
            "meterproxy_quota_backend_up",
            "1 while the quota store answers (redis, or the host process of `serve --workers`).",
            ["backend"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.quota_backend_errors = Counter(
            "meterproxy_quota_backend_errors",
            "Quota store failures (timeouts, refused connections), by operation.",
            ["backend", "op"],
            registry=registry,
        )
        self.quota_unchecked = Counter(
            "meterproxy_quota_unchecked_admissions",
            "Requests admitted without a quota check: the store was down and the tenant's "
            "limits fail open (quota.on_backend_error).",
            ["tenant"],
            registry=registry,
        )
        self.quota_drift = Gauge(
            "meterproxy_quota_drift_ratio",
            "(spend in Redis - spend in the ledger) / limit, per tenant and budget, at the last "
            "check (quota.drift_check_s).",
            ["tenant", "limit"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.quota_rebuilds = Counter(
            "meterproxy_quota_rebuilds",
            "Budgets rebuilt from the ledger after the quota store lost them.",
            ["tenant"],
            registry=registry,
        )

    def track(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """A gauge whose value is read from a function when scraped; in a process of
        `serve --workers` (whose scrape reads the shared files), written there once a second
        by `keep_tracked`."""
        if self.multiprocess:
            self._tracked.append((gauge, read))
        else:
            gauge.set_function(read)

    def refresh_tracked(self) -> None:
        for gauge, read in self._tracked:
            gauge.set(read())

    async def keep_tracked(self) -> None:
        """A worker's or the host's tracked gauges, written to the shared files once a second."""
        while True:
            self.refresh_tracked()
            await asyncio.sleep(1.0)

    def observe(self, record: Settlement) -> None:
        key = (record.endpoint, record.model, record.upstream, record.tenant, record.status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, *key)
        usage = record.usage
        # Counts are never negative (usage keeps only non-negative integers, costs are priced
        # from non-negative figures): `> 0` is the library's own check, and skips a zero.
        if (value := usage.prompt) is not None and value > 0:
            series.prompt.inc(value)
        if (value := usage.completion) is not None and value > 0:
            series.completion.inc(value)
        if (value := usage.cached_prompt) is not None and value > 0:
            series.cached.inc(value)
        if (value := usage.reasoning) is not None and value > 0:
            series.reasoning.inc(value)
        series.requests.inc(1)
        if record.estimated:
            series.estimates.inc(1)
        if record.waste_reason is not None and usage.completion:
            self.child(self.wasted, record.model, record.tenant, record.waste_reason).inc(
                usage.completion
            )
        if record.upstream_error is not None:
            self.child(self.upstream_errors, record.upstream, record.upstream_error).inc()
        if record.reached_upstream:
            if record.cost_usd > 0:
                series.cost.inc(record.cost_usd)
            if not record.priced:
                series.unpriced.inc(1)
            series.duration.observe(record.duration_ns / 1e9)
            if record.energy_j is not None:
                energy = self._energy.get((record.model, record.upstream))
                if energy is None:
                    energy = self._energy[record.model, record.upstream] = (
                        self.request_energy.labels(record.model, record.upstream)
                    )
                energy.observe(record.energy_j)
            if record.first_token_ns is not None:
                series.ttft.observe((record.first_token_ns - record.started_ns) / 1e9)
            tpot_ns = record.tpot_ns
            if tpot_ns is not None:
                series.tpot.observe(tpot_ns / 1e9)

    def child(self, metric: Any, *labels: str) -> Any:
        """A labelled child, resolved once per label set (labels come from configuration and
        enums, so the set is bounded)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def inflight_for(self, upstream: str) -> InFlight:
        found = self._inflight.get(upstream)
        if found is None:
            found = self._inflight[upstream] = InFlight()
            self.track(self.inflight.labels(upstream), found.get)  # workers: written each second
        return found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class InFlight:
    """Requests being relayed to one upstream: a plain count, read when the gauge is collected
    (a gauge's inc/dec take a lock and cost a few µs, twice a request)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1

    def get(self) -> float:
        return self.value


class Cell(Protocol):
    """A labelled counter child's value, without the library's per-call checks (`cell`)."""

    def inc(self, amount: float) -> None: ...


def cell(child: Counter) -> Cell:
    """The value cell of a counter child labelled here. `Counter.inc` checks that the child has
    its labels and that the amount is not negative, three Python calls before the value's own
    locked add; a caller that passes only positive amounts may use the cell: the same values,
    under the same lock (or in the shared files of `--workers`). Counters only: a gauge's `set`
    also stamps the time in the shared files of `--workers` (its `mostrecent` modes keep the
    newest sample), which a cell's `set` would leave at 0 and the host would drop."""
    value: Cell = child._value
    return value


class _Buckets:
    """A histogram child, observed as the library observes it (the sum, and the count of the
    first bucket whose bound is at or above the amount), without its per-call checks."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._sum: Cell = child._sum
        self._buckets: list[Cell] = child._buckets
        self._bounds: list[float] = child._upper_bounds  # ends at +Inf

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        if amount == amount:  # a NaN falls in no bucket, as in the library
            self._buckets[bisect_left(self._bounds, amount)].inc(1)


class _Series:
    """The metric cells one (endpoint, model, upstream, tenant, status) settles into.

    Every settled request increments five to eight of them. The library's `inc` first checks
    that the child has its labels and the amount is not negative (three Python calls before the
    value's own locked add); these children are labelled here, and `observe` passes only
    positive amounts, so their value cells are kept and incremented directly: the same
    values, under the same lock (or in the shared files of `--workers`), ~0.4 us less each.
    `tests/test_metrics.py` checks the exposition equals the library's public path."""

    __slots__ = (
        "cached",
        "completion",
        "cost",
        "duration",
        "estimates",
        "prompt",
        "reasoning",
        "requests",
        "tpot",
        "ttft",
        "unpriced",
    )

    def __init__(
        self, m: Metrics, endpoint: str, model: str, upstream: str, tenant: str, status: str
    ) -> None:
        self.requests = cell(m.requests.labels(endpoint, model, upstream, tenant, status))
        self.prompt = cell(m.tokens.labels(model, upstream, tenant, "prompt"))
        self.completion = cell(m.tokens.labels(model, upstream, tenant, "completion"))
        self.cached = cell(m.tokens.labels(model, upstream, tenant, "cached_prompt"))
        self.reasoning = cell(m.tokens.labels(model, upstream, tenant, "reasoning"))
        self.estimates = cell(m.estimates.labels(model))
        self.cost = cell(m.cost.labels(model, upstream, tenant))
        self.unpriced = cell(m.unpriced.labels(model))
        self.duration = _Buckets(m.duration.labels(model, upstream))
        self.ttft = _Buckets(m.ttft.labels(model, upstream))
        self.tpot = _Buckets(m.tpot.labels(model, upstream))
