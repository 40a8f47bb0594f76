"""Dashboards as code: `python grafana/generate.py` writes grafana/dashboards/*.json.

Every query filters on the `model`, `upstream` and `tenant` variables; tests run each one
(variables substituted) against a real Prometheus scraping the demo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
R = "[$__rate_interval]"
ALL = '{model=~"$model",upstream=~"$upstream",tenant=~"$tenant"}'
MU = '{model=~"$model",upstream=~"$upstream"}'
TOKENS = '{model=~"$model",upstream=~"$upstream",tenant=~"$tenant",type=~"prompt|completion"}'
COMPLETION = '{model=~"$model",upstream=~"$upstream",tenant=~"$tenant",type="completion"}'
REJECTED = 'meterproxy_quota_rejections_total{tenant=~"$tenant"}'
WASTED = 'meterproxy_wasted_tokens_total{model=~"$model",tenant=~"$tenant"}'


def panel(
    title: str,
    exprs: list[tuple[str, str]],
    unit: str,
    kind: str = "timeseries",
    description: str = "",
) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": (
            {
                "legend": {"displayMode": "list", "placement": "bottom"},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
            if kind == "timeseries"
            else {"reduceOptions": {"calcs": ["lastNotNull"]}}
        ),
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend, "datasource": DS}
            for i, (expr, legend) in enumerate(exprs)
        ],
    }


def quantiles(metric: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{MU}{R})))", f"p{p}")
        for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))
    ]


def variable(name: str, metric: str) -> dict[str, Any]:
    query = f"label_values({metric}, {name})"
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "sort": 1,
        "current": {"text": "All", "value": "$__all"},
    }


def dashboard(
    uid: str, title: str, description: str, panels: list[dict[str, Any]]
) -> dict[str, Any]:
    # Two columns of half-width panels; a table takes a row of its own.
    x = y = 0
    for i, p in enumerate(panels):
        p["id"] = i + 1
        width = 24 if p["type"] == "table" else 12
        if x + width > 24:
            x, y = 0, y + 8
        p["gridPos"] = {"h": 8, "w": width, "x": x, "y": y}
        x += width
        if x >= 24:
            x, y = 0, y + 8
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["meterproxy"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("model", "meterproxy_requests_total"),
                variable("upstream", "meterproxy_requests_total"),
                variable("tenant", "meterproxy_requests_total"),
            ]
        },
        "panels": panels,
        "annotations": {"list": []},
    }


def overview() -> dict[str, Any]:
    return dashboard(
        "meterproxy-overview",
        "meterproxy / Overview",
        "Traffic, errors and latency through the proxy.",
        [
            panel(
                "Requests per second",
                [(f"sum by (model) (rate(meterproxy_requests_total{ALL}{R}))", "{{model}}")],
                "reqps",
            ),
            panel(
                "Tokens per second",
                [(f"sum by (type) (rate(meterproxy_tokens_total{TOKENS}{R}))", "{{type}}")],
                "short",
            ),
            panel(
                "Error rate (5xx, 499)",
                [
                    (
                        f'sum(rate(meterproxy_requests_total{{model=~"$model",upstream=~"$upstream",'
                        f'tenant=~"$tenant",status=~"5..|499"}}{R})) / '
                        f"sum(rate(meterproxy_requests_total{ALL}{R}))",
                        "error share",
                    )
                ],
                "percentunit",
            ),
            panel(
                "In flight",
                [
                    (
                        'sum by (upstream) (meterproxy_inflight_requests{upstream=~"$upstream"})',
                        "{{upstream}}",
                    )
                ],
                "short",
            ),
            panel("End-to-end latency", quantiles("meterproxy_request_duration_seconds"), "s"),
            panel("Time to first token", quantiles("meterproxy_time_to_first_token_seconds"), "s"),
            panel(
                "Time per output token", quantiles("meterproxy_time_per_output_token_seconds"), "s"
            ),
            panel(
                "Engine vs proxy: token drift",
                [
                    (
                        'meterproxy_engine_token_drift_ratio{upstream=~"$upstream"}',
                        "{{upstream}} {{type}}",
                    )
                ],
                "percentunit",
                description="(engine - proxy) / engine from the engine's own counters (vLLM): "
                "above 0, traffic reaches the engine without being metered.",
            ),
        ],
    )


def efficiency() -> dict[str, Any]:
    energy = f"meterproxy_energy_joules_total{ALL}"
    cost = f"meterproxy_cost_usd_total{ALL}"
    return dashboard(
        "meterproxy-efficiency",
        "meterproxy / Efficiency",
        "What the tokens cost: joules and dollars.",
        [
            panel(
                "Tokens per joule (= tokens/s per W)",
                [
                    (
                        f"sum by (model, upstream) (rate(meterproxy_tokens_total{TOKENS}{R})) / "
                        f"sum by (model, upstream) (rate({energy}{R}))",
                        "{{model}} on {{upstream}}",
                    )
                ],
                "short",
                description="Prompt + completion tokens per attributed GPU joule.",
            ),
            panel(
                "Joules per request",
                [
                    (
                        f"sum by (model) (rate(meterproxy_request_energy_joules_sum{MU}{R})) / "
                        f"sum by (model) (rate(meterproxy_request_energy_joules_count{MU}{R}))",
                        "{{model}}",
                    )
                ],
                "J",
            ),
            panel("GPU power", [("meterproxy_gpu_power_watts", "GPU {{gpu}}")], "watt"),
            panel(
                "Idle share of GPU energy",
                [
                    (
                        f"sum(rate(meterproxy_gpu_idle_energy_joules_total{R})) / "
                        f"sum(rate(meterproxy_gpu_energy_joules_total{R}))",
                        "idle",
                    )
                ],
                "percentunit",
            ),
            panel(
                "USD per million tokens",
                [
                    (
                        f"sum by (model) (rate({cost}{R})) / "
                        f"sum by (model) (rate(meterproxy_tokens_total{TOKENS}{R})) * 1e6",
                        "{{model}}",
                    )
                ],
                "currencyUSD",
            ),
            panel(
                "Tokens per dollar",
                [
                    (
                        f"sum by (model) (rate(meterproxy_tokens_total{TOKENS}{R})) / "
                        f"sum by (model) (rate({cost}{R}))",
                        "{{model}}",
                    )
                ],
                "short",
            ),
            panel(
                "Cost per tenant (range)",
                [(f"sum by (tenant) (increase({cost}[$__range]))", "{{tenant}}")],
                "currencyUSD",
                kind="stat",
            ),
            panel(
                "Energy per tenant (range)",
                [(f"sum by (tenant) (increase({energy}[$__range]))", "{{tenant}}")],
                "J",
                kind="stat",
            ),
        ],
    )


def tenants() -> dict[str, Any]:
    return dashboard(
        "meterproxy-tenants",
        "meterproxy / Tenants",
        "Usage against quotas, spend, waste, and efficiency rather than volume.",
        [
            panel(
                "Usage against quota",
                [
                    (
                        'max by (tenant, limit) (meterproxy_quota_usage_ratio{tenant=~"$tenant"})',
                        "{{tenant}} {{limit}}",
                    )
                ],
                "percentunit",
            ),
            panel(
                "Rejections by limit",
                [
                    (
                        f"sum by (tenant, limit) (rate({REJECTED}{R}))",
                        "{{tenant}} {{limit}}",
                    )
                ],
                "reqps",
            ),
            panel(
                "Spend (range)",
                [
                    (
                        f"sum by (tenant) (increase(meterproxy_cost_usd_total{ALL}[$__range]))",
                        "{{tenant}}",
                    )
                ],
                "currencyUSD",
                kind="stat",
            ),
            panel(
                "Wasted tokens by reason",
                [
                    (
                        'sum by (reason) (rate(meterproxy_wasted_tokens_total{model=~"$model",'
                        f'tenant=~"$tenant"}}{R}))',
                        "{{reason}}",
                    )
                ],
                "short",
            ),
            panel(
                "Efficiency ranking: tokens per dollar",
                [
                    (
                        "sort_desc(sum by (tenant) (increase(meterproxy_tokens_total"
                        f"{TOKENS}[$__range])) / sum by (tenant) "
                        f"(increase(meterproxy_cost_usd_total{ALL}[$__range])))",
                        "{{tenant}}",
                    )
                ],
                "short",
                kind="table",
            ),
            panel(
                "Efficiency ranking: waste share",
                [
                    (
                        f"sort(sum by (tenant) (increase({WASTED}[$__range])) / sum by (tenant) "
                        f"(increase(meterproxy_tokens_total{COMPLETION}[$__range])))",
                        "{{tenant}}",
                    )
                ],
                "percentunit",
                kind="table",
            ),
        ],
    )


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, build in (("overview", overview), ("efficiency", efficiency), ("tenants", tenants)):
        (OUT / f"{name}.json").write_text(json.dumps(build(), indent=2) + "\n")


if __name__ == "__main__":
    main()
