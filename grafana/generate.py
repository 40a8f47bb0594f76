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


# Task counters carry tenant, model and result (no upstream: a task may span several).
TASKS = '{tenant=~"$tenant",model=~"$model"}'
SUCCESSES = 'meterproxy_task_outcomes_total{tenant=~"$tenant",model=~"$model",result="success"}'


def per_success(counter: str, by: str, window: str) -> str:
    """Every attempt of every task (all results) over the successful tasks, in one window."""
    return (
        f"sum by ({by}) (increase({counter}{TASKS}[{window}])) / "
        f"(sum by ({by}) (increase({SUCCESSES}[{window}])) > 0)"
    )


PER_SUCCESS = (
    "Cost of every attempt of every task - successful, failed, unrated, retried, duplicate - "
    "divided by the successful tasks, over the past hour (deploy/rules.yml records the same)."
)


def value() -> dict[str, Any]:
    return dashboard(
        "meterproxy-value",
        "meterproxy / Value",
        "Value, not volume: successful tasks, and what each one cost in dollars and joules.",
        [
            panel(
                "Successful tasks per hour",
                [(f"sum by (tenant) (rate({SUCCESSES}{R})) * 3600", "{{tenant}}")],
                "short",
                description="Tasks whose last reported outcome was a success, as they close.",
            ),
            panel(
                "Task outcomes per hour",
                [
                    (
                        f"sum by (result) (rate(meterproxy_task_outcomes_total{TASKS}{R})) * 3600",
                        "{{result}}",
                    )
                ],
                "short",
                description="unknown: no outcome was reported before the task went idle.",
            ),
            panel(
                "USD per successful task, by tenant",
                [(per_success("meterproxy_task_cost_usd_total", "tenant", "1h"), "{{tenant}}")],
                "currencyUSD",
                description=PER_SUCCESS,
            ),
            panel(
                "USD per successful task, by model",
                [(per_success("meterproxy_task_cost_usd_total", "model", "1h"), "{{model}}")],
                "currencyUSD",
                description=PER_SUCCESS + " A task belongs to the model that served most of it.",
            ),
            panel(
                "Joules per successful task, by tenant",
                [
                    (
                        per_success("meterproxy_task_energy_joules_total", "tenant", "1h"),
                        "{{tenant}}",
                    )
                ],
                "J",
                description=PER_SUCCESS.replace("Cost", "GPU energy"),
            ),
            panel(
                "Joules per successful task, by model",
                [(per_success("meterproxy_task_energy_joules_total", "model", "1h"), "{{model}}")],
                "J",
                description=PER_SUCCESS.replace("Cost", "GPU energy"),
            ),
            panel(
                "Wasted tokens by reason",
                [(f"sum by (reason) (rate({WASTED}{R}))", "{{reason}}")],
                "short",
                description="Completion tokens of no use: duplicate, truncated, client_disconnect, "
                "upstream_error (a duplicate that also failed counts under its failure).",
            ),
            panel(
                "Duplicate share of requests",
                [
                    (
                        "sum by (tenant) (rate(meterproxy_duplicate_requests_total"
                        f"{TASKS}[5m])) / (sum by (tenant) "
                        f"(rate(meterproxy_requests_total{ALL}[5m])) > 0)",
                        "{{tenant}}",
                    )
                ],
                "percentunit",
                description="Requests repeating one the same tenant already got an answer to.",
            ),
            panel(
                "Efficiency ranking: USD per successful task (range)",
                [
                    (
                        "sort("
                        + per_success("meterproxy_task_cost_usd_total", "tenant", "$__range")
                        + ")",
                        "{{tenant}}",
                    )
                ],
                "currencyUSD",
                kind="table",
                description="Cheapest success first. Tokens never rank: a tenant that burns "
                "tokens without results sinks.",
            ),
            panel(
                "Success rate (range)",
                [
                    (
                        f"sum by (tenant) (increase({SUCCESSES}[$__range])) / (sum by (tenant) "
                        '(increase(meterproxy_task_outcomes_total{tenant=~"$tenant",'
                        'model=~"$model",result=~"success|failure"}[$__range])) > 0)',
                        "{{tenant}}",
                    )
                ],
                "percentunit",
                kind="stat",
                description="Successful tasks / rated tasks (unknown outcomes left out).",
            ),
        ],
    )


def main() -> None:
    OUT.mkdir(exist_ok=True)
    boards = (("overview", overview), ("efficiency", efficiency), ("tenants", tenants))
    for name, build in (*boards, ("value", value)):
        (OUT / f"{name}.json").write_text(json.dumps(build(), indent=2) + "\n")


if __name__ == "__main__":
    main()
