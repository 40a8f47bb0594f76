"""Value, not volume, end to end with the official SDK: tasks of several calls (retries
included) grouped by x-meterproxy-task, outcomes reported before and after their requests
settle, in meterproxy's shape and TensorZero's, tenants kept to their own tasks, duplicates
within and outside the window, and the per-success figures against the ledger by hand."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from typing import Any

import aiohttp
import openai
import pytest

from meterproxy import cli
from meterproxy.keys import LEDGER
from meterproxy.sim.upstream import Behavior, with_failure

from .conftest import Proxy, StartProxy, StartUpstream, Upstream

KEYS = {"a": "key-of-tenant-a", "b": "key-of-tenant-b"}
ADMIN_KEY = "admin-key-for-value-tests"
ENVIRON = {"KEY_A": KEYS["a"], "KEY_B": KEYS["b"], "ADMIN_KEY": ADMIN_KEY}
MODELS = {
    "gpt-4o-mini": Behavior(tokens=12),
    "flaky": with_failure(Behavior(tokens=12), "reset", 3),  # breaks off mid-stream
    "down": with_failure(Behavior(), "http_500_html"),  # 500: the SDK retries it
    "slow": Behavior(tokens=20, pace_s=0.05),  # a one-second stream
}
PRICES = {m: {"input": 1.0, "output": 2.0} for m in MODELS}  # USD per million tokens


def ask(text: str = "Summarize the incident report.") -> list[Any]:
    return [{"role": "user", "content": text}]


async def start(
    start_upstream: StartUpstream, start_proxy: StartProxy, **value: Any
) -> tuple[Proxy, Upstream]:
    up: Upstream = await start_upstream(dict(MODELS), flavor="openai")
    tree = {
        "upstreams": [{"name": "openai", "url": up.url, "kind": "openai"}],
        "pricing": {"models": PRICES},
        "tenants": {"a": {"keys": ["env:KEY_A"]}, "b": {"keys": ["env:KEY_B"]}},
        "auth": {"admin_keys": ["env:ADMIN_KEY"]},
        "value": {"task_idle_s": 1, "outcome_grace_s": 0.3, "duplicate_window_s": 60, **value},
    }
    proxy: Proxy = await start_proxy(tree, ENVIRON)
    return proxy, up


def client(proxy: Proxy, tenant: str, retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=KEYS[tenant], max_retries=retries)


async def feedback(c: openai.AsyncOpenAI, body: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/feedback through the SDK's own request path (its errors, its retries off)."""
    answer: dict[str, Any] = await c.post("/feedback", cast_to=object, body=body)
    return answer


def task(name: str) -> dict[str, str]:
    return {"x-meterproxy-task": name}


async def closed(proxy: Proxy, tenant: str, count: int, timeout_s: float = 10.0) -> None:
    """Until `count` of the tenant's tasks have closed into the counters."""
    for _ in range(int(timeout_s / 0.05)):
        if proxy.total("meterproxy_task_outcomes_total", tenant=tenant) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{tenant}: fewer than {count} tasks closed in {timeout_s}s")


def ledger(proxy: Proxy) -> sqlite3.Connection:
    db = sqlite3.connect(proxy.server.runner.app[LEDGER].path)
    db.row_factory = sqlite3.Row
    return db


async def written(proxy: Proxy) -> sqlite3.Connection:
    await asyncio.sleep(0.3)  # both writers flush every 100 ms
    return ledger(proxy)


def by_task(db: sqlite3.Connection, tenant: str) -> dict[str, list[sqlite3.Row]]:
    """The tenant's ledger rows that reached an upstream, by task, joined by hand."""
    rows = db.execute(
        "SELECT q.*, t.task_id AS task FROM requests q "
        "LEFT JOIN task_requests t ON t.request_id = q.request_id "
        "WHERE q.tenant = ? AND q.outcome != 'refused' ORDER BY q.id",
        (tenant,),
    ).fetchall()
    tasks: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        tasks.setdefault(row["task"] or row["request_id"], []).append(row)
    return tasks


def tokens(rows: list[sqlite3.Row]) -> int:
    return sum((r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0) for r in rows)


async def test_a_task_of_several_calls_counts_every_attempt_once_and_per_success_figures_match(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy, up = await start(start_upstream, start_proxy)
    async with client(proxy, "a", retries=2) as c:
        # ticket-1: a stream breaks off, the app retries; a 500 the SDK retries twice itself;
        # then the answer. Five attempts, one task.
        with pytest.raises(openai.APIConnectionError):
            stream = await c.chat.completions.create(
                model="flaky", messages=ask(), stream=True, extra_headers=task("ticket-1")
            )
            async for _ in stream:
                pass
        with pytest.raises(openai.InternalServerError):
            await c.chat.completions.create(
                model="down", messages=ask(), extra_headers=task("ticket-1")
            )
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=ask(), extra_headers=task("ticket-1")
        )
        assert raw.parse().choices[0].message.content
        last_key = raw.headers["x-meterproxy-request-id"]
        # ticket-2: two calls, then a failure with a score and a metric
        for text in ("Draft a reply.", "Shorten the draft."):
            await c.chat.completions.create(
                model="gpt-4o-mini", messages=ask(text), extra_headers=task("ticket-2")
            )
        # one request sent alone: its own task, never rated
        await c.chat.completions.create(model="gpt-4o-mini", messages=ask("A lone question."))
        first = await feedback(c, {"task_id": "ticket-1", "success": True})
        again = await feedback(c, {"request_id": last_key, "success": True})  # the same task
        failed = await feedback(
            c, {"task_id": "ticket-2", "success": False, "score": 0.1, "metric": "tests_passed"}
        )
    assert first["task_id"] == again["task_id"] == "ticket-1"
    assert (first["result"], first["in_flight"], first["task_state"]) == ("success", 0, "open")
    assert uuid.UUID(first["feedback_id"]) != uuid.UUID(again["feedback_id"])
    assert (failed["result"], failed["score"], failed["metric"]) == ("failure", 0.1, "tests_passed")
    await closed(proxy, "a", 3)
    assert up.fake.requests_total == 8  # 1 + 3 + 1 + 2 + 1 attempts reached the upstream

    db = await written(proxy)
    tasks = by_task(db, "a")
    assert {name: len(rows) for name, rows in tasks.items() if "ticket" in name} == {
        "ticket-1": 5,
        "ticket-2": 2,
    }
    [lone] = [rows for name, rows in tasks.items() if "ticket" not in name]
    expected = {"success": tasks["ticket-1"], "failure": tasks["ticket-2"], "unknown": lone}
    model = "gpt-4o-mini"  # most tokens of every task
    for result, rows in expected.items():
        labels = {"tenant": "a", "model": model, "result": result}
        assert proxy.sample("meterproxy_task_outcomes_total", **labels) == 1  # reported twice
        assert proxy.sample("meterproxy_task_cost_usd_total", **labels) == pytest.approx(
            sum(r["cost_usd"] for r in rows)
        )
        assert proxy.sample("meterproxy_task_tokens_total", **labels) == tokens(rows)
    assert proxy.sample("meterproxy_feedback_reports_total", tenant="a", result="success") == 2
    # The failed attempts cost something and are in the success's figure. (Rows are in the
    # order they settled: the broken stream's partial count may finish after later requests.)
    [broken] = [r for r in tasks["ticket-1"] if r["model"] == "flaky"]
    assert broken["cost_usd"] > 0
    # USD per successful task = every attempt of every task / successful tasks (the recording
    # rule's formula, on the counters) = the ledger's total cost for the tenant / 1, by hand.
    by_hand = sum(r["cost_usd"] for rows in tasks.values() for r in rows) / 1
    counted = proxy.total("meterproxy_task_cost_usd_total", tenant="a") / proxy.total(
        "meterproxy_task_outcomes_total", tenant="a", result="success"
    )
    assert counted == pytest.approx(by_hand)
    assert proxy.total("meterproxy_task_cost_usd_total", tenant="a") == pytest.approx(
        proxy.total("meterproxy_cost_usd_total", tenant="a")
    )
    outcome = db.execute("SELECT * FROM task_outcomes WHERE task_id = 'ticket-1'").fetchone()
    assert (outcome["success"], outcome["reports"]) == (1, 2)

    # The leaderboard computes the same figures from the tables.
    path = proxy.server.runner.app[LEDGER].path
    assert cli.main(["leaderboard", "--ledger", path, "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["tenant"], row["successes"], row["tasks"]) == ("a", 1, 3)
    assert row["success_rate"] == 0.5 and row["unrated_share"] == pytest.approx(1 / 3)
    assert row["usd_per_success"] == pytest.approx(by_hand)
    assert row["tokens"] == sum(tokens(rows) for rows in tasks.values())

    # The status page shows the task counters once they exist.
    async with http.get(
        proxy.url + "/ui/data", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        shown = await r.json()
    rows = {(t["metric"], t["labels"]): t["value"] for t in shown["tasks"]}
    labels = f"model={model},result=success,tenant=a"
    assert rows[("meterproxy_task_outcomes_total", labels)] == 1
    assert rows[("meterproxy_task_cost_usd_total", labels)] == pytest.approx(
        sum(r["cost_usd"] for r in tasks["ticket-1"])
    )


async def test_feedback_before_settlement_is_kept_and_joined_later(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    proxy, _ = await start(start_upstream, start_proxy)
    async with client(proxy, "a") as c:
        async with c.chat.completions.with_streaming_response.create(
            model="slow", messages=ask(), stream=True, extra_headers=task("long-1")
        ) as response:
            key = response.headers["x-meterproxy-request-id"]
            # Reported while the stream is still running, by request and by task.
            by_request = await feedback(c, {"request_id": key, "success": False})
            by_task = await feedback(c, {"task_id": "long-1", "success": True})
            assert (by_request["task_id"], by_request["in_flight"]) == ("long-1", 1)
            assert (by_task["result"], by_task["in_flight"], by_task["task_state"]) == (
                "success",
                1,
                "open",
            )
            assert proxy.total("meterproxy_task_outcomes_total") == 0
            chunks = [chunk async for chunk in await response.parse()]
        assert len(chunks) > 10
        await closed(proxy, "a", 1)
        [stream] = [s for s in proxy.settled if s.request_id == key]
        labels = {"tenant": "a", "model": "slow", "result": "success"}  # the last report won
        assert proxy.sample("meterproxy_task_outcomes_total", **labels) == 1
        assert stream.cost_usd > 0
        assert proxy.sample("meterproxy_task_cost_usd_total", **labels) == stream.cost_usd

        # After settlement: a request sent alone, reported by its key.
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=ask("Classify this ticket.")
        )
        key = raw.headers["x-meterproxy-request-id"]
        for _ in range(500):  # settled within moments of the answer
            if any(s.request_id == key for s in proxy.settled):
                break
            await asyncio.sleep(0.01)
        after = await feedback(c, {"request_id": key, "success": True, "score": 0.9})
        assert after["task_id"] == key and after["in_flight"] == 0
        await closed(proxy, "a", 2)
        assert proxy.total("meterproxy_task_outcomes_total", tenant="a", result="success") == 2

        # A report after the task closed reaches the table, not the counters (counted once).
        late = await feedback(c, {"request_id": key, "success": False})
        assert late["task_state"] == "closed"
        await asyncio.sleep(0.5)
        assert proxy.total("meterproxy_task_outcomes_total", tenant="a", result="failure") == 0
        db = await written(proxy)
        row = db.execute("SELECT * FROM task_outcomes WHERE task_id = ?", (key,)).fetchone()
        assert (row["success"], row["score"], row["reports"]) == (0, None, 2)


async def test_tensorzero_shaped_feedback_maps_onto_the_same_store(
    start_upstream: StartUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy, _ = await start(start_upstream, start_proxy)
    async with client(proxy, "a") as c:
        keys = []
        for name in ("episode-1", "episode-2", "episode-3", "episode-4"):
            raw = await c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=ask(name), extra_headers=task(name)
            )
            keys.append(raw.headers["x-meterproxy-request-id"])
        # A boolean metric on an episode (a task), a float one on an inference (a request).
        answers = [
            await feedback(
                c, {"metric_name": "task_success", "episode_id": "episode-1", "value": True}
            ),
            await feedback(c, {"metric_name": "quality", "inference_id": keys[1], "value": 0.8}),
            await feedback(
                c, {"metric_name": "quality", "inference_id": keys[2], "value": 0.3, "tags": {}}
            ),
            await feedback(
                c,
                {
                    "metric_name": "task_success",
                    "episode_id": "episode-4",
                    "value": True,
                    "dryrun": True,
                },
            ),
        ]
        assert [(a["task_id"], a["result"], a["score"], a["metric"]) for a in answers] == [
            ("episode-1", "success", None, "task_success"),
            ("episode-2", "success", 0.8, "quality"),  # 0.8 >= value.success_score (0.5)
            ("episode-3", "failure", 0.3, "quality"),
            ("episode-4", "success", None, "task_success"),
        ]
        assert answers[3]["dryrun"] is True
        refusals = [
            (
                {
                    "metric_name": "m",
                    "episode_id": "episode-1",
                    "inference_id": keys[0],
                    "value": True,
                },
                "Both episode_id and inference_id cannot be provided",
            ),
            ({"metric_name": "comment", "episode_id": "episode-1", "value": "nice"}, "text"),
            ({"metric_name": "m", "episode_id": "episode-1", "value": 7}, "from 0 to 1"),
            ({"metric_name": "m", "episode_id": "episode-1", "value": "yes"}, "a boolean"),
            ({"metric_name": "m", "episode_id": "episode-1", "value": True, "x": 1}, "`x`"),
            ({"metric_name": "m", "value": True}, "exactly one"),
        ]
        for body, said in refusals:
            with pytest.raises(openai.BadRequestError) as refused:
                await feedback(c, body)
            assert said in refused.value.message and refused.value.code in (
                "invalid_value",
                "invalid_type",
            )
    # TensorZero's clients post to /feedback at the gateway's root, and read feedback_id.
    async with http.post(
        proxy.url + "/feedback",
        json={"metric_name": "task_success", "episode_id": "episode-1", "value": False},
        headers={"Authorization": f"Bearer {KEYS['a']}"},
    ) as r:
        assert r.status == 200
        assert uuid.UUID((await r.json())["feedback_id"])
    await closed(proxy, "a", 4)
    results = {
        result: proxy.total("meterproxy_task_outcomes_total", tenant="a", result=result)
        for result in ("success", "failure", "unknown")
    }
    assert results == {"success": 1, "failure": 2, "unknown": 1}  # the dry run stored nothing
    db = await written(proxy)
    stored = {
        r["task_id"]: (r["success"], r["score"], r["metric"])
        for r in db.execute("SELECT * FROM task_outcomes")
    }
    assert stored == {
        "episode-1": (0, None, "task_success"),  # the last report won
        "episode-2": (1, 0.8, "quality"),
        "episode-3": (0, 0.3, "quality"),
    }


async def test_a_tenant_reports_only_on_its_own_tasks_and_unknown_ids_are_404(
    start_upstream: StartUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy, up = await start(start_upstream, start_proxy)
    async with client(proxy, "a") as a, client(proxy, "b") as b:
        raw = await a.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=ask(), extra_headers=task("shared-name")
        )
        grouped = raw.headers["x-meterproxy-request-id"]
        raw = await a.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=ask())
        alone = raw.headers["x-meterproxy-request-id"]
        for body in (
            {"request_id": grouped, "success": True},
            {"task_id": "shared-name", "success": True},
            {"task_id": alone, "success": True},  # a request sent alone is its own task
            {"metric_name": "ok", "inference_id": alone, "value": True},
        ):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await feedback(b, body)
            assert refused.value.code == "not_your_task"
            shape = refused.value.body
            assert isinstance(shape, dict) and "another tenant" in shape["message"]
            assert shape == {  # OpenAI's error shape
                "message": shape["message"],
                "type": "invalid_request_error",
                "param": next(k for k in body if k.endswith("_id")),
                "code": "not_your_task",
            }
        for body, code in (
            ({"task_id": "no-such-task", "success": True}, "task_not_found"),
            ({"request_id": "mp-0-1", "success": True}, "request_not_found"),
            ({"metric_name": "ok", "episode_id": "nothing", "value": True}, "task_not_found"),
        ):
            with pytest.raises(openai.NotFoundError) as missing:
                await feedback(a, body)
            assert missing.value.code == code
        # b's own task of the same name is b's: reported, and a's stays unrated.
        await b.chat.completions.create(
            model="gpt-4o-mini", messages=ask(), extra_headers=task("shared-name")
        )
        assert (await feedback(b, {"task_id": "shared-name", "success": True}))["in_flight"] == 0
    async with http.post(proxy.base_url + "/feedback", json={"task_id": "x", "success": True}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    await closed(proxy, "a", 2)
    await closed(proxy, "b", 1)
    assert proxy.total("meterproxy_task_outcomes_total", tenant="a", result="unknown") == 2
    assert proxy.total("meterproxy_task_outcomes_total", tenant="b", result="success") == 1

    # Another process on the same ledger (a restart) knows the requests from the tables.
    path = proxy.server.runner.app[LEDGER].path
    await asyncio.sleep(0.3)
    again: Proxy = await start_proxy(
        {
            "upstreams": [{"name": "openai", "url": up.url, "kind": "openai"}],
            "tenants": {"a": {"keys": ["env:KEY_A"]}, "b": {"keys": ["env:KEY_B"]}},
            "ledger": {"path": path},
        },
        ENVIRON,
    )
    async with client(again, "a") as a, client(again, "b") as b:
        assert (await feedback(a, {"request_id": alone, "success": True}))["task_id"] == alone
        assert (await feedback(a, {"task_id": "shared-name", "success": True}))["task_state"] == (
            "closed"
        )
        with pytest.raises(openai.PermissionDeniedError):
            await feedback(b, {"request_id": grouped, "success": True})


async def test_duplicates_within_the_window_are_waste_and_outside_it_are_not(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    proxy, _ = await start(start_upstream, start_proxy, duplicate_window_s=1.5)
    prompt = "Write a haiku about GPUs."
    async with client(proxy, "a") as a, client(proxy, "b") as b:
        await a.chat.completions.create(model="gpt-4o-mini", messages=ask(prompt))
        # The same request again, however it travels: whitespace, `user`, streaming, key order.
        await a.chat.completions.create(model="gpt-4o-mini", messages=ask(prompt))
        await a.chat.completions.create(
            model="gpt-4o-mini", messages=ask("  Write a haiku\nabout GPUs. "), user="bot-7"
        )
        stream = await a.chat.completions.create(
            model="gpt-4o-mini", messages=ask(prompt), stream=True
        )
        async for _ in stream:
            pass
        # Not repeats: another prompt, another model setting, another tenant.
        await a.chat.completions.create(model="gpt-4o-mini", messages=ask(prompt + " Twice."))
        await a.chat.completions.create(model="gpt-4o-mini", messages=ask(prompt), temperature=0)
        await b.chat.completions.create(model="gpt-4o-mini", messages=ask(prompt))
        # Retries after a failure are not duplicates: nothing was answered.
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                await a.chat.completions.create(model="down", messages=ask(prompt))
        # A truncated repeat stays `truncated` (the reason that says more) and is counted.
        for _ in range(2):
            await a.chat.completions.create(model="gpt-4o-mini", messages=ask("Cut."), max_tokens=4)
        assert proxy.total("meterproxy_duplicate_requests_total", tenant="a") == 4
        await asyncio.sleep(1.6)  # past the window
        await a.chat.completions.create(model="gpt-4o-mini", messages=ask(prompt))
        assert proxy.total("meterproxy_duplicate_requests_total", tenant="a") == 4
        await a.chat.completions.create(model="gpt-4o-mini", messages=ask(prompt))
    assert proxy.sample("meterproxy_duplicate_requests_total", tenant="a", model="gpt-4o-mini") == 5
    assert proxy.total("meterproxy_duplicate_requests_total", tenant="b") == 0
    db = await written(proxy)
    rows = db.execute(
        "SELECT q.completion_tokens, q.waste_reason, t.duplicate FROM requests q "
        "LEFT JOIN task_requests t ON t.request_id = q.request_id WHERE q.tenant = 'a' "
        "ORDER BY q.id"
    ).fetchall()
    flags = [(r["waste_reason"], r["duplicate"]) for r in rows]
    assert flags == [
        (None, None),
        ("duplicate", 1),
        ("duplicate", 1),
        ("duplicate", 1),
        (None, None),
        (None, None),
        (None, None),
        (None, None),
        (None, None),
        ("truncated", None),
        ("truncated", 1),
        (None, None),
        ("duplicate", 1),
    ]
    wasted = sum(r["completion_tokens"] for r in rows if r["waste_reason"] == "duplicate")
    assert wasted == 4 * 12
    assert proxy.total("meterproxy_wasted_tokens_total", tenant="a", reason="duplicate") == wasted
    assert proxy.total("meterproxy_wasted_tokens_total", tenant="a", reason="truncated") == 8
