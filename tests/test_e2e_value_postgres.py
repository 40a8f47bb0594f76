"""Value, not volume, with the ledger on a real PostgreSQL server, through the real proxy and
the official SDK: tasks with retries, feedback before and after settlement, duplicates, all
landing in PostgreSQL beside the ledger's rows; `meterproxy leaderboard --config` on that config
printing the figures computed by hand from those rows; replicas sharing the database agreeing on
one salt and answering feedback on each other's tasks; and PostgreSQL down: feedback that needs
it is a 503, the rows wait and arrive, the salt is read once it is back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest
import yaml
from psycopg.rows import dict_row

from meterproxy import cli
from meterproxy.keys import VALUE

from .conftest import Proxy, StartProxy, StartUpstream, Upstream
from .postgres import PostgresServer, postgres_server, query
from .test_e2e_postgres import until
from .test_e2e_value import ENVIRON, MODELS, PRICES, ask, client, closed, feedback, task


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
async def up(start_upstream: StartUpstream) -> Upstream:
    upstream: Upstream = await start_upstream(dict(MODELS), flavor="openai")
    return upstream


def tree(up: Upstream, url: str, tmp_path: Path, replica: int = 0, **value: Any) -> dict[str, Any]:
    return {
        "upstreams": [{"name": "openai", "url": up.url, "kind": "openai"}],
        "pricing": {"models": PRICES},
        "tenants": {"a": {"keys": ["env:KEY_A"]}, "b": {"keys": ["env:KEY_B"]}},
        "ledger": {"url": url, "spill_path": str(tmp_path / f"spill-{replica}.db")},
        "quota": {"state_path": str(tmp_path / f"quota-{replica}.db")},
        "value": {"task_idle_s": 1, "outcome_grace_s": 0.3, "duplicate_window_s": 60, **value},
    }


def rows(url: str, sql: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(sql).fetchall()


async def landed(url: str, proxy: Proxy, task_rows: int, outcomes: int) -> None:
    """Until every settled request, task row and outcome report is in PostgreSQL."""

    def count(sql: str) -> int:
        try:
            return int(query(url, sql)[0][0])
        except psycopg.Error:  # down, or the table not created yet
            return -1

    await until(
        lambda: (
            count("SELECT count(*) FROM requests") == len(proxy.settled)
            and count("SELECT count(*) FROM task_requests") == task_rows
            and count("SELECT coalesce(sum(reports), 0) FROM task_outcomes") == outcomes
        )
    )


def by_hand(url: str) -> dict[str, dict[str, Any]]:
    """The leaderboard's figures per tenant, from PostgreSQL's rows by plain Python."""
    requests = rows(
        url,
        "SELECT q.request_id AS key, q.tenant AS tenant, q.cost_usd AS cost, "
        "coalesce(q.prompt_tokens, 0) + coalesce(q.completion_tokens, 0) AS tokens, "
        "t.task_id AS task, t.duplicate AS duplicate "
        "FROM requests q LEFT JOIN task_requests t ON t.request_id = q.request_id "
        "WHERE q.outcome <> 'refused'",
    )
    outcomes = {
        (r["tenant"], r["task_id"]): r["success"]
        for r in rows(url, "SELECT tenant, task_id, success FROM task_outcomes")
    }
    figures: dict[str, dict[str, Any]] = {}
    for tenant in {r["tenant"] for r in requests}:
        mine = [r for r in requests if r["tenant"] == tenant]
        tasks = {r["task"] or r["key"] for r in mine}
        results = [outcomes.get((tenant, t)) for t in tasks]
        successes = results.count(True)
        cost = sum(r["cost"] for r in mine)
        figures[tenant] = {
            "tasks": len(tasks),
            "successes": successes,
            "success_rate": successes / (successes + results.count(False)),
            "usd_per_success": cost / successes if successes else None,
            "cost_usd": cost,
            "requests": len(mine),
            "duplicate_share": sum(1 for r in mine if r["duplicate"]) / len(mine),
            "tokens": sum(r["tokens"] for r in mine),
        }
    return figures


@pytest.mark.slow
async def test_tasks_outcomes_and_duplicates_land_in_postgresql_and_the_leaderboard_reads_them(
    up: Upstream,
    start_proxy: StartProxy,
    pg_server: PostgresServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = pg_server.create_database()
    proxy: Proxy = await start_proxy(tree(up, url, tmp_path), ENVIRON)
    async with client(proxy, "a", retries=2) as a, client(proxy, "b") as b:
        # ticket-1: a 500 the SDK retries twice, then the answer; reported after settlement.
        with pytest.raises(openai.InternalServerError):
            await a.chat.completions.create(
                model="down", messages=ask(), extra_headers=task("ticket-1")
            )
        await a.chat.completions.create(
            model="gpt-4o-mini", messages=ask(), extra_headers=task("ticket-1")
        )
        after = await feedback(a, {"task_id": "ticket-1", "success": True})
        assert (after["in_flight"], after["task_state"]) == (0, "open")
        # long-1: reported while its stream runs, by request (a failure), then by task (the
        # last report wins).
        async with a.chat.completions.with_streaming_response.create(
            model="slow", messages=ask("Long."), stream=True, extra_headers=task("long-1")
        ) as response:
            key = response.headers["x-meterproxy-request-id"]
            early = await feedback(a, {"request_id": key, "success": False})
            last = await feedback(a, {"task_id": "long-1", "success": True, "score": 0.7})
            assert early["in_flight"] == last["in_flight"] == 1
            assert len([chunk async for chunk in await response.parse()]) > 10
        # The same prompt three times, sent alone: the second and third are duplicates.
        for _ in range(3):
            await a.chat.completions.create(model="gpt-4o-mini", messages=ask("Same again."))
        # A request sent alone, reported by its key after it settled.
        raw = await a.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=ask("Alone.")
        )
        alone = raw.headers["x-meterproxy-request-id"]
        await until(lambda: any(s.request_id == alone for s in proxy.settled))
        await feedback(a, {"request_id": alone, "success": True, "score": 0.9})
        # Tenant b: a two-call task that failed, and one of a's duplicates' prompt (not b's).
        for text in ("Draft.", "Redraft."):
            await b.chat.completions.create(
                model="gpt-4o-mini", messages=ask(text), extra_headers=task("b-1")
            )
        await b.chat.completions.create(model="gpt-4o-mini", messages=ask("Same again."))
        await feedback(b, {"task_id": "b-1", "success": False})
    await closed(proxy, "a", 6)  # ticket-1, long-1, 3 alone (unrated), alone (rated)
    await closed(proxy, "b", 2)
    assert proxy.total("meterproxy_duplicate_requests_total", tenant="a") == 2
    assert proxy.total("meterproxy_duplicate_requests_total", tenant="b") == 0

    # 4 ticket-1 + 1 long-1 + 2 duplicates + 2 b-1 task rows; 5 reports.
    await landed(url, proxy, task_rows=9, outcomes=5)
    stored = {
        (r["tenant"], r["task_id"]): r
        for r in rows(url, "SELECT tenant, task_id, success, score, reports FROM task_outcomes")
    }
    assert {k: (v["success"], v["score"], v["reports"]) for k, v in stored.items()} == {
        ("a", "ticket-1"): (True, None, 1),
        ("a", "long-1"): (True, 0.7, 2),
        ("a", alone): (True, 0.9, 1),
        ("b", "b-1"): (False, None, 1),
    }
    duplicates = query(
        url,
        "SELECT q.waste_reason FROM task_requests t JOIN requests q USING (request_id) "
        "WHERE t.duplicate",
    )
    assert duplicates == [("duplicate",), ("duplicate",)]
    assert query(url, "SELECT count(*) FROM value_meta") == [(1,)]
    assert query(url, "SELECT value FROM value_meta")[0][0] == proxy.server.runner.app[VALUE].salt

    # The leaderboard, on the proxy's own config, prints the figures computed by hand.
    config = tmp_path / "meterproxy.yaml"
    config.write_text(yaml.safe_dump(tree(up, url, tmp_path)))
    with pytest.MonkeyPatch.context() as env:
        for name, value in ENVIRON.items():
            env.setenv(name, value)
        assert cli.main(["leaderboard", "--config", str(config), "--format", "json"]) == 0
        board = {r["tenant"]: r for r in json.loads(capsys.readouterr().out)}
        assert cli.main(["leaderboard", "--config", str(config)]) == 0
        table = capsys.readouterr().out.splitlines()
    expected = by_hand(url)
    assert set(board) == set(expected) == {"a", "b"}
    for tenant, figures in expected.items():
        assert {k: board[tenant][k] for k in figures} == pytest.approx(figures), tenant
    a_figures = expected["a"]
    assert (a_figures["tasks"], a_figures["successes"], a_figures["requests"]) == (6, 3, 9)
    assert a_figures["cost_usd"] == pytest.approx(
        proxy.total("meterproxy_cost_usd_total", tenant="a")
    )
    # The counters' per-success cost is the same figure (every attempt / successes).
    assert a_figures["usd_per_success"] == pytest.approx(
        proxy.total("meterproxy_task_cost_usd_total", tenant="a")
        / proxy.total("meterproxy_task_outcomes_total", tenant="a", result="success")
    )
    assert [line.split()[:3] for line in table[2:4]] == [["1", "a", "3"], ["2", "b", "0"]]


async def test_replicas_sharing_postgresql_make_one_salt_and_answer_for_each_other(
    up: Upstream, start_proxy: StartProxy, pg_server: PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.create_database()
    first, second = await asyncio.gather(
        start_proxy(tree(up, url, tmp_path, replica=0), ENVIRON),
        start_proxy(tree(up, url, tmp_path, replica=1), ENVIRON),
    )
    salts = {p.server.runner.app[VALUE].salt for p in (first, second)}
    assert len(salts) == 1 and query(url, "SELECT value FROM value_meta") == [(salts.pop(),)]

    async with client(first, "a") as a:
        raw = await a.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=ask(), extra_headers=task("handed-over")
        )
        key = raw.headers["x-meterproxy-request-id"]
    await landed(url, first, task_rows=1, outcomes=0)
    # The second replica never saw the task: it finds it, and its owner, in PostgreSQL.
    async with client(second, "a") as a, client(second, "b") as b:
        answer = await feedback(a, {"task_id": "handed-over", "success": True})
        assert (answer["task_id"], answer["task_state"]) == ("handed-over", "closed")
        assert (await feedback(a, {"request_id": key, "success": True}))["task_id"] == (
            "handed-over"
        )
        for body in ({"task_id": "handed-over", "success": True}, {"request_id": key}):
            with pytest.raises(openai.PermissionDeniedError):
                await feedback(b, {"success": False, **body})
    await landed(url, first, task_rows=1, outcomes=2)
    assert query(url, "SELECT tenant, task_id, success, reports FROM task_outcomes") == [
        ("a", "handed-over", True, 2)
    ]


@pytest.mark.slow
async def test_postgresql_down_feedback_that_needs_it_is_503_and_rows_and_salt_arrive_later(
    up: Upstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    with postgres_server() as server:
        url = server.create_database()
        await asyncio.to_thread(server.stop)
        proxy: Proxy = await start_proxy(tree(up, url, tmp_path), ENVIRON)
        meter = proxy.server.runner.app[VALUE]
        assert not meter.salt_stored  # a salt for this process meanwhile
        async with client(proxy, "a") as a:
            for _ in range(2):
                await a.chat.completions.create(
                    model="gpt-4o-mini", messages=ask(), extra_headers=task("t-1")
                )
            # Known in memory: accepted, stored later.
            assert (await feedback(a, {"task_id": "t-1", "success": True}))["in_flight"] == 0
            # Not in memory: only the database could say whose it is.
            with pytest.raises(openai.InternalServerError) as refused:
                await feedback(a, {"task_id": "from-another-replica", "success": True})
            assert refused.value.status_code == 503
            assert refused.value.code == "ledger_unavailable"
        assert proxy.sample("meterproxy_ledger_queued_rows", place="memory") >= 2 + 2 + 1
        assert proxy.sample("meterproxy_ledger_errors_total", kind="write") > 0
        await asyncio.to_thread(server.start)
        await landed(url, proxy, task_rows=2, outcomes=1)
        await until(lambda: meter.salt_stored, timeout_s=15)
        assert query(url, "SELECT value FROM value_meta") == [(meter.salt,)]
        await until(lambda: proxy.sample("meterproxy_ledger_queued_rows", place="memory") == 0)
        assert proxy.total("meterproxy_ledger_errors_total", kind="dropped") == 0
