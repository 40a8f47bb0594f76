"""deploy/ and grafana/, checked for real: promtool on the config and the alert rules (with unit
tests for every alert), the compose file and Kubernetes manifests, and every dashboard query run
against a real Prometheus scraping the demo under load."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from meterproxy import demo
from meterproxy.energy.simulated import SimulatedGpus
from meterproxy.keys import RUNTIME

from .missing import missing

ROOT = Path(__file__).resolve().parent.parent
DEPLOY, GRAFANA = ROOT / "deploy", ROOT / "grafana"


def binary(name: str) -> str:
    """A Debian `prometheus` binary: skipped with a reason on a laptop, a failure in CI."""
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed (apt-get install -y prometheus)")
    return found


def promtool(*args: str) -> str:
    result = subprocess.run([binary("promtool"), *args], cwd=DEPLOY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_accepts_the_config_and_rules() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    alerts = [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]
    rules = sum(len(group["rules"]) for group in groups)
    assert f"SUCCESS: {rules} rules found" in promtool("check", "rules", "alerts.yml")
    tested = yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())["tests"]
    cases = {case["alertname"] for test in tested for case in test.get("alert_rule_test", [])}
    assert set(alerts) <= cases, f"alerts without a promtool test case: {set(alerts) - cases}"
    recorded = yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"]
    count = sum(len(group["rules"]) for group in recorded)
    assert f"SUCCESS: {count} rules found" in promtool("check", "rules", "rules.yml")


def test_every_alert_has_a_passing_unit_test() -> None:
    alerts = {
        r["alert"]
        for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    tested = {
        t["alertname"]
        for case in yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    assert alerts == tested
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


def test_compose_and_kubernetes_manifests_parse_and_reference_real_files() -> None:
    from meterproxy import config

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {
        "meterproxy-1",
        "meterproxy-2",
        "redis",
        "vllm-sim",
        "load",
        "prometheus",
        "grafana",
    }
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose.get("volumes", {}) or (DEPLOY / source).exists(), source
        if "build" in service:
            assert (DEPLOY / service["build"] / "Dockerfile").exists()
    # Two replicas of one configuration, sharing the compose file's Redis, both scraped.
    replicas = [services["meterproxy-1"], services["meterproxy-2"]]
    assert replicas[0]["command"] == replicas[1]["command"]
    assert {r["ports"][0] for r in replicas} == {"8080:8080", "8081:8080"}
    shared = config.load(DEPLOY / "replicas.yaml", {"RESEARCH_KEY": "k", "SUPPORT_KEY": "s"})
    assert shared.quota.backend == "redis" and shared.quota.redis_location == "redis:6379/0"
    assert "noeviction" in services["redis"]["command"]
    scraped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scraped["static_configs"][0]["targets"] == ["meterproxy-1:8080", "meterproxy-2:8080"]
    # The replicas' command is one `meterproxy serve` (the image's entrypoint) accepts.
    from meterproxy import cli

    args = cli._parser().parse_args(["serve", *replicas[0]["command"]])
    assert args.config == "/etc/meterproxy/replicas.yaml"
    assert args.data_dir == "/var/lib/meterproxy"
    assert {v.split(":")[1] for r in replicas for v in r["volumes"]} >= {args.data_dir}

    kinds: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds[doc["kind"], doc["metadata"]["name"]] = doc
    assert set(kinds) == {
        ("ConfigMap", "meterproxy"),
        ("Deployment", "meterproxy"),
        ("Service", "meterproxy"),
        ("ServiceMonitor", "meterproxy"),
        ("PodDisruptionBudget", "meterproxy"),
        ("Deployment", "redis"),
        ("Service", "redis"),
    }
    deployment = kinds["Deployment", "meterproxy"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert (
        deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    )
    assert deployment["spec"]["replicas"] >= 2
    budget = kinds["PodDisruptionBudget", "meterproxy"]["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    embedded = config.parse(
        yaml.safe_load(kinds["ConfigMap", "meterproxy"]["data"]["meterproxy.yaml"]),
        {"RESEARCH_KEY": "k"},
    )
    # The Redis the replicas share is the Service redis.yaml defines, on its port.
    redis_service = kinds["Service", "redis"]["spec"]
    assert embedded.quota.backend == "redis"
    assert embedded.quota.redis_location == f"redis:{redis_service['ports'][0]['port']}/0"
    redis = kinds["Deployment", "redis"]["spec"]["template"]
    assert redis_service["selector"] == redis["metadata"]["labels"]
    assert "noeviction" in redis["spec"]["containers"][0]["args"]
    config.load(DEPLOY / "meterproxy.yaml", {"RESEARCH_KEY": "k"})


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        p.stem: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def test_dashboards_are_current_and_well_formed() -> None:
    before = {name: json.dumps(d, sort_keys=True) for name, d in dashboards().items()}
    subprocess.run([sys.executable, str(GRAFANA / "generate.py")], check=True)
    assert {n: json.dumps(d, sort_keys=True) for n, d in dashboards().items()} == before
    for board in before and dashboards().values():
        names = [v["name"] for v in board["templating"]["list"]]
        assert names == ["datasource", "model", "upstream", "tenant"]
        assert board["schemaVersion"] >= 36
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["fieldConfig"]["defaults"]["unit"]
        cells: dict[tuple[int, int], str] = {}  # no two panels share a grid cell
        for panel in board["panels"]:
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24
            for cx in range(g["x"], g["x"] + g["w"]):
                for cy in range(g["y"], g["y"] + g["h"]):
                    assert (cx, cy) not in cells, (panel["title"], cells[(cx, cy)])
                    cells[(cx, cy)] = panel["title"]
    for path in (GRAFANA / "provisioning").rglob("*.yaml"):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1


def readme_queries() -> list[str]:
    """Every PromQL expression the README shows in a code span."""
    text = (DEPLOY.parent / "README.md").read_text()
    return re.findall(r"`([^`\n]*rate\(meterproxy_[^`\n]*)`", text)


def substitute(expr: str) -> str:
    for var, value in (
        ("$__rate_interval", "20s"),
        ("$__range", "10m"),
        ("$model", ".*"),
        ("$upstream", ".*"),
        ("$tenant", ".*"),
    ):
        expr = expr.replace(var, value)
    return expr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def query(
    http: aiohttp.ClientSession, url: str, expr: str, at: float | None = None
) -> list[dict[str, Any]]:
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    async with http.get(url + "/api/v1/query", params=params) as r:
        body = await r.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_every_panel_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = binary("prometheus")
    proxy_port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{DEPLOY / 'rules.yml'}']\n"
        "scrape_configs:\n  - job_name: meterproxy\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{proxy_port}']}}]\n"
    )
    prom = await asyncio.create_subprocess_exec(
        prometheus,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        async with demo.running(port=proxy_port, workdir=tmp_path) as d:
            tracker = d.proxy.runner.app[RUNTIME].energy
            assert tracker is not None and isinstance(tracker.source, SimulatedGpus)
            gpu = tracker.source
            base = d.proxy.url + "/v1"
            await demo.load(base, workers=4, stop_after_s=8)  # every series exists
            await asyncio.sleep(2)  # all settled, energy final, scraped: the GPU is idle

            def truth() -> tuple[int, float, int]:
                """What the simulated server served and the simulated GPU consumed."""
                served = d.upstream.prompt_tokens_total + d.upstream.generated_total
                return served, gpu.true_mj("0") / 1000, d.upstream.requests_total

            (tokens_a, energy_a, requests_a), t_a = truth(), time.time()
            await demo.load(base, workers=4, stop_after_s=20)
            await asyncio.sleep(0.5)  # the last requests' energy becomes final
            (tokens_b, energy_b, requests_b), t_b = truth(), time.time()
            tokens, energy_j, elapsed = tokens_b - tokens_a, energy_b - energy_a, t_b - t_a
            requests = requests_b - requests_a
            await asyncio.sleep(2)  # scraped
            async with aiohttp.ClientSession() as http:
                empty = []
                for board in dashboards().values():
                    for panel in board["panels"]:
                        for target in panel["targets"]:
                            expr = substitute(target["expr"])
                            if not await query(http, prom_url, expr):
                                empty.append(f"{board['title']} / {panel['title']}: {expr}")
                for expr in readme_queries():  # the README's own PromQL returns data too
                    if not await query(http, prom_url, expr.replace("[5m]", "[20s]")):
                        empty.append(f"README: {expr}")
                assert empty == []
                # The efficiency figures against what the test knows independently: the
                # tokens-per-joule panel's query summed over models and upstreams, over the
                # second run, against the simulated server's tokens / the simulated GPU's joules.
                efficiency = dashboards()["efficiency"]["panels"]
                per_joule = substitute(efficiency[0]["targets"][0]["expr"])
                by_model = await query(http, prom_url, per_joule)
                assert {r["metric"]["model"] for r in by_model} == {"llama-3.1-8b", "qwen2.5-7b"}
                # A window reaching into the idle time on both sides holds exactly this run.
                window = f"[{round(elapsed) + 2}s]"
                [total] = await query(
                    http,
                    prom_url,
                    per_joule.replace("sum by (model, upstream)", "sum").replace("[20s]", window),
                    at=t_b + 1,
                )
                assert float(total["value"][1]) == pytest.approx(tokens / energy_j, rel=0.05)
                per_request = substitute(efficiency[1]["targets"][0]["expr"])
                assert efficiency[1]["title"] == "Joules per request"
                [joules] = await query(
                    http,
                    prom_url,
                    per_request.replace("sum by (model)", "sum").replace("[20s]", window),
                    at=t_b + 1,
                )
                assert float(joules["value"][1]) == pytest.approx(energy_j / requests, rel=0.05)
                power = await query(
                    http,
                    prom_url,
                    f"avg_over_time(meterproxy_gpu_power_watts[{round(elapsed)}s])",
                    at=t_b,
                )
                watts = float(power[0]["value"][1])
                assert 70 <= watts <= 700  # between idle and the board limit
                assert energy_j / elapsed == pytest.approx(watts, rel=0.2)
                # 8B-class models on modern GPUs: about 1 to 20 tokens per joule
                assert 0.5 <= tokens / energy_j <= 20
                await value_figures(http, prom_url, t_b + 2)
    finally:
        prom.terminate()
        await asyncio.wait_for(prom.wait(), 10)


async def value_figures(http: aiohttp.ClientSession, url: str, at: float) -> None:
    """The Value dashboard's story and deploy/rules.yml's recording rules on the demo's traffic:
    every tenant's cost per success counts all its tasks' attempts, and the recorded series
    equal the dashboard's own query over the same hour."""
    value = dashboards()["value"]["panels"]
    per_tenant = substitute(
        next(p for p in value if p["title"] == "USD per successful task, by tenant")["targets"][0][
            "expr"
        ]
    )
    figures = {
        r["metric"]["tenant"]: float(r["value"][1])
        for r in await query(http, url, per_tenant, at=at)
    }
    assert "research" in figures  # most of its tasks succeed
    # The token-maxing loop rarely reports a success; when it has one, each cost many times
    # what research pays.
    if "tokenmaxx" in figures:
        assert figures["tokenmaxx"] > 5 * figures["research"]
    recorded = {
        r["metric"]["tenant"]: float(r["value"][1])
        for r in await query(http, url, "tenant:meterproxy_task_cost_usd_per_success:ratio_1h")
    }
    live = {r["metric"]["tenant"]: float(r["value"][1]) for r in await query(http, url, per_tenant)}
    assert recorded.keys() == live.keys()
    for tenant, figure in recorded.items():
        assert figure == pytest.approx(live[tenant], rel=0.1)
    shares = {
        r["metric"]["tenant"]: float(r["value"][1])
        for r in await query(http, url, "tenant:meterproxy_duplicate_share:ratio_1h")
    }
    assert shares["tokenmaxx"] > 0.5 and shares.get("research", 0.0) == 0.0
