"""The proxy's own short memory of its metrics: a snapshot of the registry's samples every few
seconds, kept in a bounded ring, so the status page can draw the last minutes without
Prometheus. Pure: samples in, numbers out (no aiohttp, no prometheus_client).

A snapshot keeps only what the page shows, keyed by metric and label values; the difference of
two snapshots is what happened between them, so every figure on the page is a difference of
the same counters `/metrics` exposes.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Sample = tuple[str, Mapping[str, str], float]  # (sample name, labels, value), as /metrics has it
Key = tuple[str, ...]  # label values, in the order below

# Counters (and histogram parts, which only grow): sample name -> (short name, labels kept).
# Labels left out (e.g. `endpoint`) are summed over.
COUNTERS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "meterproxy_requests_total": ("requests", ("model", "upstream", "tenant", "status")),
    "meterproxy_tokens_total": ("tokens", ("model", "upstream", "tenant", "type")),
    "meterproxy_cost_usd_total": ("cost", ("model", "upstream", "tenant")),
    "meterproxy_energy_joules_total": ("energy", ("model", "upstream", "tenant")),
    "meterproxy_wasted_tokens_total": ("waste", ("model", "tenant", "reason")),
    "meterproxy_quota_rejections_total": ("rejections", ("tenant", "limit")),
    "meterproxy_request_energy_joules_count": ("metered", ("model", "upstream")),
    "meterproxy_request_energy_joules_sum": ("metered_j", ("model", "upstream")),
    "meterproxy_time_to_first_token_seconds_bucket": ("ttft", ("model", "upstream", "le")),
    "meterproxy_gpu_energy_joules_total": ("gpu_energy", ("gpu",)),
    "meterproxy_gpu_idle_energy_joules_total": ("gpu_idle", ("gpu",)),
}
GAUGES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "meterproxy_gpu_power_watts": ("power", ("gpu",)),
    "meterproxy_quota_usage_ratio": ("quota", ("tenant", "limit")),
    "meterproxy_inflight_requests": ("inflight", ("upstream",)),
}
# Outcome metrics (cost and energy per successful task) are passed through as they are.
TASK_PREFIX = "meterproxy_task_"


Series = Mapping[str, Mapping[Key, float]]  # short name -> label values -> value


@dataclass(frozen=True)
class Snapshot:
    t_s: float  # wall clock, Unix seconds
    counters: Series
    gauges: Series
    tasks: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (sample, labels)

    def since(self, older: Snapshot) -> Snapshot:
        """What the counters did between `older` and this one; gauges as they are now."""
        counters = {}
        for name, series in self.counters.items():
            before = older.counters.get(name, {})
            counters[name] = {k: max(v - before.get(k, 0.0), 0.0) for k, v in series.items()}
        return Snapshot(self.t_s - older.t_s, counters, self.gauges, self.tasks)

    def sums(self, name: str, *by: str, **match: str) -> dict[tuple[str, ...], float]:
        """One metric's values whose labels equal `match`, summed by the labels `by`, in one
        pass (a page poll must stay cheap with thousands of series)."""
        labels = _LABELS[name]
        keep = [labels.index(label) for label in by]
        wanted = [(labels.index(label), value) for label, value in match.items()]
        out: dict[tuple[str, ...], float] = {}
        source = self.gauges if name in _GAUGE_NAMES else self.counters
        for key, value in source.get(name, {}).items():
            if all(key[i] == v for i, v in wanted):
                group = tuple(key[i] for i in keep)
                out[group] = out.get(group, 0.0) + value
        return out

    def total(self, name: str, **match: str) -> float:
        return self.sums(name, **match).get((), 0.0)


_LABELS = {short: labels for short, labels in (*COUNTERS.values(), *GAUGES.values())}
_GAUGE_NAMES = frozenset(short for short, _ in GAUGES.values())


def take(samples: Iterable[Sample], t_s: float) -> Snapshot:
    counters: dict[str, dict[Key, float]] = {}
    gauges: dict[str, dict[Key, float]] = {}
    tasks: dict[tuple[str, str], float] = {}
    for name, labels, value in samples:
        if name in COUNTERS:
            short, keep, into = *COUNTERS[name], counters
        elif name in GAUGES:
            short, keep, into = *GAUGES[name], gauges
        elif name.startswith(TASK_PREFIX) and not name.endswith("_created"):
            shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            tasks[(name, shown)] = tasks.get((name, shown), 0.0) + value
            continue
        else:
            continue
        key = tuple(labels.get(label, "") for label in keep)
        series = into.setdefault(short, {})
        series[key] = series.get(key, 0.0) + value
    return Snapshot(t_s, counters, gauges, tasks)


@dataclass(frozen=True)
class Point:
    """One step of the charts: what happened between two consecutive snapshots."""

    t_s: float  # the step's end
    dt_s: float
    tokens_by_model: Mapping[str, float]  # prompt + completion, settled in the step
    power_w: Mapping[str, float]  # by GPU, at the step's end
    tokens: float
    energy_j: float
    cost_usd: float


class History:
    """A bounded ring of snapshots, oldest first, and the chart points between them."""

    def __init__(self, history_s: float, interval_s: float) -> None:
        self.interval_s = interval_s
        size = max(2, math.ceil(history_s / interval_s) + 1)
        self.snapshots: collections.deque[Snapshot] = collections.deque(maxlen=size)
        self.points: collections.deque[Point] = collections.deque(maxlen=size - 1)

    def add(self, snapshot: Snapshot) -> None:
        if self.snapshots:
            self.points.append(_point(snapshot, self.snapshots[-1]))
        self.snapshots.append(snapshot)

    def at_or_before(self, t_s: float) -> Snapshot | None:
        """The newest snapshot taken at or before `t_s`, else the oldest one kept."""
        found = None
        for snapshot in self.snapshots:
            if snapshot.t_s > t_s:
                break
            found = snapshot
        return found or (self.snapshots[0] if self.snapshots else None)


def _point(now: Snapshot, before: Snapshot) -> Point:
    step = now.since(before)
    by_model: dict[str, float] = {}
    for kind in ("prompt", "completion"):  # cached and reasoning tokens are parts of these
        for (model,), value in step.sums("tokens", "model", type=kind).items():
            by_model[model] = by_model.get(model, 0.0) + value
    return Point(
        t_s=now.t_s,
        dt_s=step.t_s,
        tokens_by_model=by_model,
        power_w={gpu: value for (gpu,), value in now.sums("power", "gpu").items()},
        tokens=step.total("tokens", type="prompt") + step.total("tokens", type="completion"),
        energy_j=step.total("energy"),
        cost_usd=step.total("cost"),
    )


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over (upper bound, cumulative count) pairs: linear
    within the bucket the rank falls in; the highest finite bound when it falls in +Inf."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower
