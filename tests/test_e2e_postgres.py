"""The PostgreSQL ledger end to end, through the real proxy and a real server: the rows equal
the Prometheus counters under load with random client cuts; PostgreSQL stopped and restarted
mid-load loses nothing and doubles nothing; with a tiny queue and PostgreSQL down, rows spill to
the local file and every one arrives once when it returns; a proxy stopped during an outage
spills its queue, and the next one drains it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meterproxy.app import stop
from meterproxy.sim.upstream import Behavior, with_failure

from .conftest import Proxy, StartProxy, StartUpstream, Upstream
from .postgres import PostgresServer, postgres_server, query
from .test_e2e_cost_ledger import run_load


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
async def gpu(start_upstream: StartUpstream) -> Upstream:
    up: Upstream = await start_upstream(
        {
            "llama": Behavior(tokens=30, pace_s=0.005),
            "broken": with_failure(Behavior(tokens=30), "reset", after=6),
        }
    )
    return up


def tree(up: Upstream, url: str, tmp_path: Path, **ledger: Any) -> dict[str, Any]:
    return {
        "upstreams": [{"name": "gpu", "url": up.url, "kind": "vllm"}],
        "pricing": {"models": {"llama": {"input": 1.0, "output": 2.0}}},
        "ledger": {"url": url, "spill_path": str(tmp_path / "spill.db"), **ledger},
    }


async def until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def stored(url: str) -> list[tuple[Any, ...]]:
    try:
        return query(url, "SELECT request_id FROM requests")
    except Exception:  # the server is down: nothing readable yet
        return []


async def all_rows_arrive(url: str, proxy: Proxy, timeout_s: float = 30.0) -> list[str]:
    """Wait until the ledger holds a row per settled request; return its keys."""
    await until(lambda: len(stored(url)) >= len(proxy.settled), timeout_s)
    await asyncio.sleep(0.3)  # anything extra (a double) would have arrived by now
    keys = [k for (k,) in stored(url)]
    assert sorted(keys) == sorted(s.request_id for s in proxy.settled)  # none lost, none doubled
    return keys


async def test_rows_equal_the_counters_under_load_with_client_cuts(
    gpu: Upstream, start_proxy: StartProxy, pg_server: PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.create_database()
    proxy: Proxy = await start_proxy(tree(gpu, url, tmp_path))
    assert await run_load(proxy.base_url, 120, seed=11) > 10
    await until(lambda: len(proxy.settled) == 120)
    await all_rows_arrive(url, proxy)
    (totals,) = query(
        url,
        "SELECT sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, sum(cost_usd), "
        "sum(completion_tokens) FILTER (WHERE waste_reason = 'client_disconnect')::bigint, "
        "count(*) FILTER (WHERE status = '499'), count(*) FILTER (WHERE status = '502') "
        "FROM requests",
    )
    assert totals[0] == proxy.total("meterproxy_tokens_total", type="prompt")
    assert totals[1] == proxy.total("meterproxy_tokens_total", type="completion")
    assert totals[2] == pytest.approx(proxy.total("meterproxy_cost_usd_total"))
    assert totals[3] == proxy.total("meterproxy_wasted_tokens_total", reason="client_disconnect")
    assert totals[4] == proxy.total("meterproxy_requests_total", status="499") > 0
    assert totals[5] == proxy.total("meterproxy_requests_total", status="502") == 24
    assert proxy.total("meterproxy_ledger_errors_total") == 0


async def waves(base_url: str, n: int, size: int) -> None:
    for wave in range(n):
        await run_load(base_url, size, seed=100 + wave)


@pytest.mark.slow
async def test_postgres_stopped_and_restarted_mid_load_loses_and_doubles_nothing(
    gpu: Upstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    with postgres_server() as server:
        url = server.create_database()
        proxy: Proxy = await start_proxy(tree(gpu, url, tmp_path))
        load = asyncio.create_task(waves(proxy.base_url, 8, 30))
        await until(lambda: len(proxy.settled) >= 45)
        await asyncio.to_thread(server.stop, "immediate")  # killed mid-load, mid-batch maybe
        await until(lambda: len(proxy.settled) >= 150)  # requests keep flowing meanwhile
        assert proxy.sample("meterproxy_ledger_errors_total", kind="write") > 0
        assert proxy.sample("meterproxy_ledger_queued_rows", place="memory") > 0
        await asyncio.to_thread(server.start)
        await load
        await until(lambda: len(proxy.settled) == 240)
        await all_rows_arrive(url, proxy)
        await until(lambda: proxy.sample("meterproxy_ledger_queued_rows", place="memory") == 0)
        assert proxy.sample("meterproxy_ledger_errors_total", kind="dropped") == 0


@pytest.mark.slow
async def test_a_tiny_queue_spills_while_postgres_is_down_and_every_row_arrives_once(
    gpu: Upstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    with postgres_server() as server:
        url = server.create_database()
        await asyncio.to_thread(server.stop)
        proxy: Proxy = await start_proxy(tree(gpu, url, tmp_path, max_queue_rows=5))
        await run_load(proxy.base_url, 80, seed=5)
        await until(lambda: len(proxy.settled) == 80)
        await until(lambda: proxy.sample("meterproxy_ledger_queued_rows", place="spill") >= 75)
        assert proxy.sample("meterproxy_ledger_queued_rows", place="memory") <= 5
        assert proxy.sample("meterproxy_ledger_spilled_rows_total") >= 75
        assert proxy.sample("meterproxy_ledger_backlog_age_seconds") > 0
        await asyncio.to_thread(server.start)
        await all_rows_arrive(url, proxy, timeout_s=60)
        await until(lambda: proxy.sample("meterproxy_ledger_queued_rows", place="spill") == 0)
        assert proxy.sample("meterproxy_ledger_backlog_age_seconds") == 0
        assert query(url, "SELECT count(*), count(DISTINCT request_id) FROM requests") == [(80, 80)]
        with sqlite3.connect(tmp_path / "spill.db") as spill:
            assert spill.execute("SELECT count(*) FROM requests").fetchone() == (0,)
        spill.close()
        assert proxy.total("meterproxy_ledger_errors_total", kind="dropped") == 0


@pytest.mark.slow
async def test_a_proxy_stopped_during_an_outage_spills_and_the_next_one_drains(
    gpu: Upstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    with postgres_server() as server:
        url = server.create_database()
        await asyncio.to_thread(server.stop)
        first: Proxy = await start_proxy(tree(gpu, url, tmp_path))
        await run_load(first.base_url, 40, seed=9)
        await until(lambda: len(first.settled) == 40)
        settled = list(first.settled)
        await stop(first.server)  # PostgreSQL is down: the queue goes to the spill file
        assert (tmp_path / "spill.db").exists()
        await asyncio.to_thread(server.start)
        second: Proxy = await start_proxy(tree(gpu, url, tmp_path))
        second.settled.extend(settled)  # the rows to expect: the first proxy's
        await all_rows_arrive(url, second)
        await until(lambda: second.sample("meterproxy_ledger_queued_rows", place="spill") == 0)
