"""What the status page and the terminal summary show, computed from the history ring: rates
over the last minute, efficiencies and quantiles over the history window, chart series.
Pure; the result is JSON-ready. Aggregates only: labels are configured names and enums, and a
key, prompt or client string never reaches a metric, so none can reach this view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypedDict

from ..policy import Tenant
from .history import History, Snapshot, quantile

RECENT_S = 60.0  # "now" figures: the last minute
# Charts average over a trailing span, not one step: tokens settle in lumps as requests end.
RATE_S = 10.0  # tokens/s
RATIO_S = 30.0  # tokens/J, $/Mtok
NO_LABEL = "_none"  # requests refused before routing carry no model/upstream
# limit -> unit of "used" and "limit" on the page
QUOTA_UNITS = {
    "requests_per_minute": "requests/min",
    "tokens_per_minute": "tokens/min",
    "tokens_per_day": "tokens today",
    "usd_per_month": "USD this month",
    "joules_per_day": "J today",
    "max_concurrent": "in flight",
}


class Totals(TypedDict):
    window_s: float
    tokens_per_s: float | None
    requests_per_s: float | None
    tokens_per_joule: float | None
    usd_per_million_tokens: float | None
    power_w: float | None
    waste_share: float | None


class ModelRow(TypedDict):
    model: str
    upstream: str
    requests: float
    tokens: float
    tokens_per_s: float | None
    energy_j: float
    tokens_per_joule: float | None
    joules_per_request: float | None
    cost_usd: float
    usd_per_million_tokens: float | None
    tokens_per_usd: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None


class UpstreamRow(TypedDict):
    upstream: str
    gpus: list[str]
    power_w: float | None
    idle_share: float | None
    inflight: float


class QuotaRow(TypedDict):
    limit: str
    unit: str
    value: float
    used: float
    ratio: float


class TenantRow(TypedDict):
    tenant: str
    requests: float
    tokens: float
    cost_usd: float
    energy_j: float
    waste: dict[str, float]
    waste_share: float | None
    rejections: dict[str, float]
    quotas: list[QuotaRow]


class TaskRow(TypedDict):
    metric: str
    labels: str
    value: float


class Series(TypedDict):
    t: list[float]
    tokens_per_s: dict[str, list[float]]
    power_w: dict[str, list[float | None]]
    tokens_per_joule: list[float | None]
    usd_per_million_tokens: list[float | None]


class View(TypedDict):
    generated_at: float
    interval_s: float
    window_s: float
    recent: Totals
    models: list[ModelRow]
    upstreams: list[UpstreamRow]
    tenants: list[TenantRow]
    tasks: list[TaskRow] | None
    series: Series


def build(
    history: History,
    now: Snapshot,
    tenants: Mapping[str, Tenant],
    upstream_gpus: Mapping[str, Iterable[str]],
) -> View:
    """`now`: a snapshot taken just now (so figures match /metrics at this instant)."""
    oldest = history.snapshots[0] if history.snapshots else now
    window = now.since(oldest)
    recent = now.since(history.at_or_before(now.t_s - RECENT_S) or now)
    return View(
        generated_at=now.t_s,
        interval_s=history.interval_s,
        window_s=window.t_s,
        recent=_totals(recent),
        models=_models(window, recent),
        upstreams=_upstreams(now, window, upstream_gpus),
        tenants=_tenants(window, now, tenants),
        tasks=[TaskRow(metric=m, labels=labels, value=v) for (m, labels), v in now.tasks.items()]
        or None,
        series=_series(history),
    )


def ratio(a: float, b: float, scale: float = 1.0) -> float | None:
    return a / b * scale if b > 0 else None


Group = tuple[str, ...]


def _tokens(s: Snapshot, *by: str, **match: str) -> dict[Group, float]:
    # Cached prompt and reasoning tokens are parts of these two: count each token once.
    out = s.sums("tokens", *by, type="prompt", **match)
    for group, value in s.sums("tokens", *by, type="completion", **match).items():
        out[group] = out.get(group, 0.0) + value
    return out


def _totals(recent: Snapshot) -> Totals:
    tokens = _tokens(recent).get((), 0.0)
    powers = recent.sums("power", "gpu")
    return Totals(
        window_s=recent.t_s,
        tokens_per_s=ratio(tokens, recent.t_s),
        requests_per_s=ratio(recent.total("requests"), recent.t_s),
        tokens_per_joule=ratio(tokens, recent.total("energy")),
        usd_per_million_tokens=ratio(recent.total("cost"), tokens, 1e6),
        power_w=sum(powers.values()) if powers else None,
        waste_share=ratio(recent.total("waste"), recent.total("tokens", type="completion")),
    )


def _models(window: Snapshot, recent: Snapshot) -> list[ModelRow]:
    by = ("model", "upstream")
    requests, energy = window.sums("requests", *by), window.sums("energy", *by)
    tokens, cost = _tokens(window, *by), window.sums("cost", *by)
    tokens_now = _tokens(recent, *by)
    metered, metered_j = window.sums("metered", *by), window.sums("metered_j", *by)
    ttft: dict[Group, list[tuple[float, float]]] = {}
    for (model, upstream, le), count in window.sums("ttft", *by, "le").items():
        ttft.setdefault((model, upstream), []).append((float(le), count))
    groups = sorted({g for g in requests if NO_LABEL not in g} | set(energy))
    rows = []
    for group in groups:
        t, j, usd = tokens.get(group, 0.0), energy.get(group, 0.0), cost.get(group, 0.0)
        buckets = ttft.get(group, [])
        rows.append(
            ModelRow(
                model=group[0],
                upstream=group[1],
                requests=requests.get(group, 0.0),
                tokens=t,
                tokens_per_s=ratio(tokens_now.get(group, 0.0), recent.t_s),
                energy_j=j,
                tokens_per_joule=ratio(t, j),
                joules_per_request=ratio(metered_j.get(group, 0.0), metered.get(group, 0.0)),
                cost_usd=usd,
                usd_per_million_tokens=ratio(usd, t, 1e6),
                tokens_per_usd=ratio(t, usd),
                ttft_p50_s=quantile(0.5, buckets),
                ttft_p95_s=quantile(0.95, buckets),
            )
        )
    return rows


def _upstreams(
    now: Snapshot, window: Snapshot, upstream_gpus: Mapping[str, Iterable[str]]
) -> list[UpstreamRow]:
    power, inflight = now.sums("power", "gpu"), now.sums("inflight", "upstream")
    measured, idle = window.sums("gpu_energy", "gpu"), window.sums("gpu_idle", "gpu")
    rows = []
    for upstream, listed in sorted(upstream_gpus.items()):
        gpus = sorted(listed)
        powers = [power[(g,)] for g in gpus if (g,) in power]
        rows.append(
            UpstreamRow(
                upstream=upstream,
                gpus=gpus,
                power_w=sum(powers) if powers else None,
                idle_share=ratio(
                    sum(idle.get((g,), 0.0) for g in gpus),
                    sum(measured.get((g,), 0.0) for g in gpus),
                ),
                inflight=inflight.get((upstream,), 0.0),
            )
        )
    return rows


def _tenants(window: Snapshot, now: Snapshot, configured: Mapping[str, Tenant]) -> list[TenantRow]:
    requests, tokens = window.sums("requests", "tenant"), _tokens(window, "tenant")
    completion = window.sums("tokens", "tenant", type="completion")
    cost, energy = window.sums("cost", "tenant"), window.sums("energy", "tenant")
    waste, rejections = (
        window.sums("waste", "tenant", "reason"),
        window.sums("rejections", "tenant", "limit"),
    )
    ratios = now.sums("quota", "tenant", "limit")
    rows = []
    for name in sorted({t for (t,) in requests} | set(configured)):
        wasted = {reason: v for (t, reason), v in sorted(waste.items()) if t == name}
        limits = configured[name].limits if name in configured else None
        quotas = []
        for (t, limit), used_ratio in sorted(ratios.items()):
            cap = getattr(limits, limit, None) if t == name and limits is not None else None
            if cap:
                quotas.append(
                    QuotaRow(
                        limit=limit,
                        unit=QUOTA_UNITS.get(limit, ""),
                        value=float(cap),
                        used=used_ratio * cap,
                        ratio=used_ratio,
                    )
                )
        rows.append(
            TenantRow(
                tenant=name,
                requests=requests.get((name,), 0.0),
                tokens=tokens.get((name,), 0.0),
                cost_usd=cost.get((name,), 0.0),
                energy_j=energy.get((name,), 0.0),
                waste=wasted,
                waste_share=ratio(sum(wasted.values()), completion.get((name,), 0.0)),
                rejections={
                    limit: v for (t, limit), v in sorted(rejections.items()) if t == name and v
                },
                quotas=quotas,
            )
        )
    return rows


def _series(history: History) -> Series:
    points = list(history.points)
    models = sorted({m for p in points for m in p.tokens_by_model})
    gpus = sorted({g for p in points for g in p.power_w})
    rates: dict[str, list[float]] = {m: [] for m in models}
    per_joule: list[float | None] = []
    per_mtok: list[float | None] = []
    rate_span = max(1, round(RATE_S / history.interval_s))
    ratio_span = max(1, round(RATIO_S / history.interval_s))
    for i in range(len(points)):
        trailing = points[max(0, i - rate_span + 1) : i + 1]
        dt = sum(p.dt_s for p in trailing)
        for m in models:
            rates[m].append(ratio(sum(p.tokens_by_model.get(m, 0.0) for p in trailing), dt) or 0.0)
        trailing = points[max(0, i - ratio_span + 1) : i + 1]
        tokens = sum(p.tokens for p in trailing)
        per_joule.append(ratio(tokens, sum(p.energy_j for p in trailing)))
        per_mtok.append(ratio(sum(p.cost_usd for p in trailing), tokens, 1e6))
    return Series(
        t=[p.t_s for p in points],
        tokens_per_s=rates,
        power_w={g: [p.power_w.get(g) for p in points] for g in gpus},
        tokens_per_joule=per_joule,
        usd_per_million_tokens=per_mtok,
    )
