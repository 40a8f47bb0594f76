"""Cost and the ledger end to end: formulas on real traffic, durability across signals,
`meterproxy usage`, and the reconciliation invariant under load with random disconnects."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from meterproxy import cli
from meterproxy.keys import LEDGER
from meterproxy.ledger import LEDGER_SCHEMA, REQUESTS
from meterproxy.sim.upstream import Behavior, with_failure
from meterproxy.store.sqlite import connect, insert_sql

from .conftest import Proxy, StartProxy, StartUpstream
from .test_cli_serve import Process, launch

MESSAGES = [{"role": "user", "content": "Say something about foxes"}]


def ledger_rows(path: str) -> list[sqlite3.Row]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    with db:
        rows = db.execute("SELECT * FROM requests ORDER BY id").fetchall()
    db.close()
    return rows


def ledger_path(proxy: Proxy) -> str:
    return proxy.server.runner.app[LEDGER].path


async def flushed(proxy: Proxy) -> list[sqlite3.Row]:
    await asyncio.sleep(0.25)  # durable within 200 ms
    return ledger_rows(ledger_path(proxy))


async def test_hosted_cost_on_real_traffic(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = await start_upstream(
        {"gpt-4o-mini": Behavior(tokens=20, cached_tokens=3), "free-model": Behavior()}
    )
    proxy: Proxy = await start_proxy(
        {
            "upstreams": [{"name": "openai", "url": up.url, "kind": "openai"}],
            "pricing": {
                "models": {"gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60}}
            },
        }
    )
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as c:
        reply = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await c.chat.completions.create(model="free-model", messages=MESSAGES)
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    expected = (
        (usage.prompt_tokens - cached) * 0.15 + cached * 0.075 + usage.completion_tokens * 0.60
    ) / 1e6
    assert proxy.sample(
        "meterproxy_cost_usd_total", model="gpt-4o-mini", upstream="openai", tenant="anonymous"
    ) == pytest.approx(expected)
    assert proxy.sample("meterproxy_unpriced_requests_total", model="free-model") == 1
    assert proxy.sample("meterproxy_unpriced_requests_total", model="gpt-4o-mini") == 0
    rows = await flushed(proxy)
    assert [r["model"] for r in rows] == ["gpt-4o-mini", "free-model"]
    assert rows[0]["cost_usd"] == pytest.approx(expected) and rows[0]["priced"] == 1
    assert (rows[1]["cost_usd"], rows[1]["priced"]) == (0, 0)
    assert (
        rows[0]["prompt_tokens"],
        rows[0]["cached_tokens"],
        rows[0]["completion_tokens"],
        rows[0]["token_source"],
    ) == (usage.prompt_tokens, 3, 20, "upstream")


async def test_local_cost_splits_gpu_time_among_concurrent_requests(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = await start_upstream({"llama": Behavior(tokens=10, pace_s=0.02)})
    proxy: Proxy = await start_proxy(
        {
            "upstreams": [{"name": "gpu", "url": up.url, "kind": "vllm", "gpus": [0, 1]}],
            "pricing": {"upstreams": {"gpu": {"gpu_hour_usd": 3600.0}}},  # 1 USD per GPU-second
        }
    )
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as c:

        async def one() -> None:
            stream = await c.chat.completions.create(model="llama", messages=MESSAGES, stream=True)
            async for _ in stream:
                pass

        await asyncio.gather(*(one() for _ in range(4)))
    records = proxy.settled
    busy = (max(r.ended_ns for r in records) - min(r.started_ns for r in records)) / 1e9
    gpu_seconds = sum(r.gpu_seconds for r in records)
    # The split covers the busy wall time once (not once per request), and each request is
    # charged its share x 2 GPUs x 1 USD/s.
    assert 0.15 < gpu_seconds <= busy
    for r in records:
        assert r.cost_usd == pytest.approx(r.gpu_seconds * 2)
    assert proxy.total("meterproxy_cost_usd_total") == pytest.approx(gpu_seconds * 2)


async def test_ledger_row_has_every_field(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = await start_upstream()
    proxy: Proxy = await start_proxy(
        {"upstreams": [{"name": "local", "url": up.url, "kind": "vllm"}]}
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.base_url + "/chat/completions",
            headers={"x-request-id": "client-7"},
            json={
                "model": "sim-llama",
                "messages": MESSAGES,
                "stream": True,
                "max_tokens": 3,
                "user": "alice",
            },
        ) as r:
            await r.read()
    [row] = await flushed(proxy)
    assert dict(row) | {"id": 0, "ts": 0, "ttft_s": 0, "duration_s": 0, "gpu_seconds": 0} == {
        "id": 0,
        "request_id": row["request_id"],  # the proxy's own key; the client's id is kept apart
        "ts": 0,
        "tenant": "anonymous",
        "model": "sim-llama",
        "upstream": "local",
        "endpoint": "chat_completions",
        "status": "200",
        "prompt_tokens": row["prompt_tokens"],
        "cached_tokens": None,
        "completion_tokens": 3,
        "reasoning_tokens": None,
        "token_source": "upstream",
        "ttft_s": 0,
        "duration_s": 0,
        "gpu_seconds": 0,
        "energy_j": None,
        "cost_usd": 0.0,
        "priced": 0,
        "waste_reason": "truncated",
        "client_request_id": "client-7",
        "client_user": "alice",
        "upstream_request_id": None,
        "outcome": "success",
    }
    assert row["request_id"].startswith("mp-") and row["request_id"] != "client-7"
    assert 0 < row["ttft_s"] <= row["duration_s"] and row["ts"] > 1.7e9


async def run_load(base_url: str, n: int, seed: int) -> int:
    """n concurrent streams; about a third hang up at a random point. Returns disconnects."""
    rng = random.Random(seed)
    disconnects = 0

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        nonlocal disconnects
        cut = rng.randrange(1, 15) if rng.random() < 0.35 else None
        body = {
            "model": "llama" if i % 5 else "broken",
            "stream": True,
            "messages": [{"role": "user", "content": "w " * i}],
        }
        async with http.post(base_url + "/chat/completions", json=body) as response:
            seen = 0
            try:
                async for _ in response.content:
                    seen += 1
                    if cut is not None and seen >= cut:
                        disconnects += 1
                        response.close()
                        return
            except aiohttp.ClientPayloadError:
                pass

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one(http, i) for i in range(n)))
    return disconnects


async def test_reconciliation_ledger_equals_metrics_equals_upstream(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = await start_upstream(
        {
            "llama": Behavior(tokens=30, pace_s=0.005),
            "broken": with_failure(Behavior(tokens=30), "reset", after=6),
        }
    )
    proxy: Proxy = await start_proxy(
        {
            "upstreams": [{"name": "gpu", "url": up.url, "kind": "vllm"}],
            "pricing": {"models": {"llama": {"input": 1.0, "output": 2.0}}},
        }
    )
    disconnects = await run_load(proxy.base_url, 120, seed=7)
    assert disconnects > 10
    for _ in range(100):
        if len(proxy.settled) == 120:
            break
        await asyncio.sleep(0.02)
    rows = await flushed(proxy)
    assert len(rows) == len(proxy.settled) == 120  # every request settled once, none lost

    def total(column: str, **where: str) -> float:
        return sum(r[column] or 0 for r in rows if all(r[k] == v for k, v in where.items()))

    # Ledger == Prometheus, for every token type, cost and status.
    for column, kind in (("prompt_tokens", "prompt"), ("completion_tokens", "completion")):
        assert total(column) == proxy.total("meterproxy_tokens_total", type=kind)
    assert total("cost_usd") == pytest.approx(proxy.total("meterproxy_cost_usd_total"))
    for status in ("200", "499", "502"):
        assert sum(1 for r in rows if r["status"] == status) == proxy.total(
            "meterproxy_requests_total", status=status
        )
    for reason in ("client_disconnect", "upstream_error"):
        assert total("completion_tokens", waste_reason=reason) == proxy.total(
            "meterproxy_wasted_tokens_total", reason=reason
        )
    # Ledger == upstream, request for request: exact where the upstream reported usage; for
    # streams cut short, what was relayed, never more than the upstream generated.
    truth = {s.headers["x-request-id"]: s for s in up.fake.seen}
    for row in rows:
        seen = truth[row["request_id"]]
        if row["token_source"] == "upstream":
            assert (row["prompt_tokens"], row["completion_tokens"]) == (
                seen.prompt_tokens,
                seen.generated,
            )
        else:
            assert row["token_source"] == "partial" and row["status"] in ("499", "502")
            assert row["completion_tokens"] <= seen.generated
            if row["status"] == "502":  # reset after 6 tokens: all 6 were relayed and counted
                assert row["completion_tokens"] == seen.generated == 6
    assert sum(1 for r in rows if r["status"] == "502") == 24


async def test_sigterm_flushes_and_sigkill_never_corrupts(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await start_upstream({"llama": Behavior(tokens=5)})
    db = tmp_path / "usage.db"
    cfg = tmp_path / "meterproxy.yaml"
    cfg.write_text(
        f"upstreams: [{{name: gpu, url: '{up.url}', kind: vllm}}]\n"
        f"ledger: {{path: '{db}'}}\nserver: {{unready_delay_s: 0}}\n"
    )

    async def requests(proxy: Process, n: int) -> None:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k") as c:
            for _ in range(n):
                await c.chat.completions.create(model="llama", messages=MESSAGES)

    proxy = await launch("--config", str(cfg), cwd=tmp_path)
    await requests(proxy, 30)
    proxy.proc.send_signal(signal.SIGTERM)  # immediately: rows still queued must be flushed
    assert await asyncio.wait_for(proxy.proc.wait(), 10) == 0
    assert len(ledger_rows(str(db))) == 30

    proxy = await launch("--config", str(cfg), cwd=tmp_path)
    await requests(proxy, 20)
    await asyncio.sleep(0.3)  # everything settled more than 200 ms ago is durable
    load = asyncio.create_task(requests(proxy, 10_000))
    await asyncio.sleep(0.2)
    proxy.proc.send_signal(signal.SIGKILL)
    with pytest.raises((openai.APIConnectionError, openai.APIStatusError)):
        await load
    await proxy.proc.wait()
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(ledger_rows(str(db))) >= 50


def test_usage_report_in_all_three_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "usage.db")
    db = connect(path, LEDGER_SCHEMA)
    now = time.time()
    rows = [  # tenant, model, completion, energy_j, cost, waste, age (days)
        ("research", "llama", 100, 360.0, 0.01, None, 0.1),
        ("research", "llama", 50, 180.0, 0.005, "client_disconnect", 0.2),
        ("support", "gpt-4o-mini", 200, None, 0.02, None, 0.3),
        ("support", "gpt-4o-mini", 999, None, 9.0, None, 30),  # outside --since 7d
    ]
    with db:
        db.execute("BEGIN")
        for i, (tenant, model, out, joules, usd, waste, age) in enumerate(rows):
            db.execute(
                insert_sql(REQUESTS),
                (
                    f"r{i}",
                    now - age * 86400,
                    tenant,
                    model,
                    "u",
                    "chat",
                    "200",
                    10,
                    0,
                    out,
                    None,
                    "upstream",
                    0.1,
                    1.0,
                    0.5,
                    joules,
                    usd,
                    1,
                    waste,
                    None,
                    None,
                    None,
                    "success",
                ),
            )
    db.close()
    assert cli.main(["usage", "--ledger", path, "--since", "7d", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == [
        {
            "tenant": "research",
            "requests": 2,
            "tokens_in": 20,
            "tokens_out": 150,
            "energy_wh": 0.15,
            "cost_usd": pytest.approx(0.015),
            "tokens_per_joule": pytest.approx(170 / 540),
            "tokens_per_dollar": pytest.approx(170 / 0.015),
            "waste_share": pytest.approx(1 / 3),
        },
        {
            "tenant": "support",
            "requests": 1,
            "tokens_in": 10,
            "tokens_out": 200,
            "energy_wh": 0.0,
            "cost_usd": 0.02,
            "tokens_per_joule": None,
            "tokens_per_dollar": pytest.approx(10500.0),
            "waste_share": 0.0,
        },
    ]
    assert (
        cli.main(
            [
                "usage",
                "--ledger",
                path,
                "--since",
                "7d",
                "--by",
                "tenant",
                "--by",
                "model",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "tenant,model,requests,tokens_in,tokens_out,energy_wh,cost_usd,"
        "tokens_per_joule,tokens_per_dollar,waste_share"
    )
    assert lines[1].startswith("research,llama,2,20,150,0.15,0.015")
    assert len(lines) == 3
    assert cli.main(["usage", "--ledger", path, "--by", "model"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["model", *lines[0].split(",")[2:]]
    assert table[2].split()[:4] == ["gpt-4o-mini", "2", "20", "1,199"]
    assert cli.main(["usage", "--ledger", path, "--by", "day", "--since", "junk"]) == 1
    assert "cannot read the time 'junk'" in capsys.readouterr().err
    assert cli.main(["usage", "--ledger", str(tmp_path / "none.db")]) == 1


def test_usage_reads_the_ledger_path_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    connect(str(tmp_path / "x.db"), LEDGER_SCHEMA).close()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"upstreams: [{{name: a, url: 'http://x/v1'}}]\nledger: {{path: '{tmp_path / 'x.db'}'}}\n"
    )
    assert cli.main(["usage", "--config", str(cfg)]) == 0
    assert "(no requests in this period)" in capsys.readouterr().out
