"""The value tables on a real PostgreSQL server: typed columns and their own schema version
beside the ledger's; the last report winning and counted once, even two reports on one task in
one batch, and a batch sent again; lookups through the ledger's rows;
replicas starting together agreeing on one salt; and the leaderboard reading PostgreSQL with the
same figures as from a SQLite file holding the same rows."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterproxy import ledger
from meterproxy.store.postgres import PostgresStore
from meterproxy.value import leaderboard
from meterproxy.value.store import (
    TASK_OUTCOMES,
    TASK_REQUESTS,
    VALUE_SCHEMA,
    OutcomeRow,
    RequestRow,
    ValueStore,
    value_store,
)

from .factories import settlement
from .postgres import PostgresServer, postgres_server, query
from .test_value_leaderboard import board, ledger_rows, value_rows, write


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    return pg_server.create_database()


def values(url: str, errors: list[str] | None = None) -> ValueStore:
    return value_store(url, None, on_error=(errors if errors is not None else []).append)


def outcome(
    task: str, success: bool, ts: float, fid: str, score: float | None = None
) -> OutcomeRow:
    return OutcomeRow("a", task, success, score, None, ts, fid)


async def insert(url: str, rows: list[RequestRow | OutcomeRow]) -> None:
    store = PostgresStore(url, VALUE_SCHEMA, timeout_s=5)
    for table, kind in ((TASK_REQUESTS, RequestRow), (TASK_OUTCOMES, OutcomeRow)):
        assert await store.insert(table, [r.row() for r in rows if isinstance(r, kind)]) == []
    await store.close()


async def test_the_tables_are_typed_and_versioned_beside_the_ledgers(pg_url: str) -> None:
    ledger_store = PostgresStore(pg_url, ledger.LEDGER_SCHEMA)
    await ledger_store.open()
    await ledger_store.close()
    store = values(pg_url)
    await store.open()
    store.add(RequestRow("r1", "a", "T", 1_700_000_000.5, True))
    store.add(outcome("T", True, 1_700_000_001.25, "f1", score=0.75))
    assert await store.flush()
    await store.close()
    assert sorted(query(pg_url, "SELECT component, version FROM schema_version")) == [
        ("ledger", 2),
        ("value", 1),
    ]
    types = dict(
        query(
            pg_url,
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE table_name IN ('task_requests', 'task_outcomes')",
        )
    )
    assert types["task_requests.duplicate"] == types["task_outcomes.success"] == "boolean"
    assert types["task_requests.ts"] == types["task_outcomes.ts"] == "timestamp with time zone"
    assert types["task_outcomes.reports"] == "bigint"
    assert types["task_outcomes.score"] == "double precision"
    assert query(
        pg_url, "SELECT request_id, extract(epoch FROM ts)::float8, duplicate FROM task_requests"
    ) == [("r1", 1_700_000_000.5, True)]
    assert query(pg_url, "SELECT success, score, reports FROM task_outcomes") == [(True, 0.75, 1)]


async def test_the_last_report_wins_and_each_is_counted_once(pg_url: str) -> None:
    store = values(pg_url)
    await store.open()
    # Two reports on one task in one batch: applied in order (one statement could not).
    store.add(outcome("T", True, 10.0, "f1"))
    store.add(outcome("T", False, 11.0, "f2"))
    store.add(outcome("U", True, 10.0, "u1"))
    assert await store.flush()
    store.add(outcome("T", True, 9.0, "replayed"))  # an older report never overwrites
    store.add(outcome("T", False, 11.0, "f2"))  # the same report again (a retried batch)
    store.add(RequestRow("r1", "a", "T", 1.0, False))
    store.add(RequestRow("r1", "a", "T", 1.0, False))
    assert await store.flush()
    store.add(outcome("U", False, 12.0, "u2", score=0.2))  # a later correction
    assert await store.flush()
    await store.close()
    assert query(
        pg_url,
        "SELECT task_id, success, score, extract(epoch FROM ts)::float8, feedback_id, reports "
        "FROM task_outcomes ORDER BY task_id",
    ) == [("T", False, None, 11.0, "f2", 2), ("U", False, 0.2, 12.0, "u2", 2)]
    assert query(pg_url, "SELECT count(*) FROM task_requests") == [(1,)]


async def test_a_batch_of_reports_sent_again_is_not_counted_again(pg_url: str) -> None:
    """What the writer does after a timeout whose commit it never heard of: the same batch
    again. The stored report is the batch's last one: nothing changes."""
    store = PostgresStore(pg_url, VALUE_SCHEMA, timeout_s=5)
    batch = [outcome("T", True, 1.0, "f1").row(), outcome("T", False, 2.0, "f2").row()]
    assert await store.insert(TASK_OUTCOMES, batch) == []
    assert await store.insert(TASK_OUTCOMES, batch) == []
    assert await store.insert(TASK_OUTCOMES, batch[:1]) == []  # a part of it, older
    await store.close()
    assert query(pg_url, "SELECT feedback_id, success, reports FROM task_outcomes") == [
        ("f2", False, 2)
    ]


async def test_a_bad_report_is_rejected_alone(pg_url: str) -> None:
    store = PostgresStore(pg_url, VALUE_SCHEMA, timeout_s=5)
    bad = OutcomeRow("a", None, True, None, None, 1.0, "bad").row()  # type: ignore[arg-type]
    good = [outcome("T", True, 1.0, "f1").row(), outcome("T", False, 2.0, "f2").row()]
    assert await store.insert(TASK_OUTCOMES, [good[0], bad, good[1]]) == [(bad, "NotNullViolation")]
    await store.close()
    assert query(pg_url, "SELECT feedback_id, reports FROM task_outcomes") == [("f2", 2)]


async def test_requests_are_found_in_these_tables_or_the_ledgers(pg_url: str) -> None:
    store = values(pg_url)
    await store.open()
    assert await store.find_request("mp-1") is None and await store.task_tenants("T") == set()
    ledger_store = PostgresStore(pg_url, ledger.LEDGER_SCHEMA)
    rows = [
        ledger.row(settlement(request_id=key, tenant=tenant))
        for key, tenant in (("mp-1", "a"), ("mp-2", "a"), ("mp-3", "b"))
    ]
    assert await ledger_store.insert(ledger.REQUESTS, rows) == []
    await ledger_store.close()
    store.add(RequestRow("mp-2", "a", "T", 1.0, False))
    store.add(RequestRow("mp-3", "b", "T", 1.0, True))
    assert await store.flush()
    assert await store.find_request("mp-1") == ("a", "mp-1")  # sent alone: its own task
    assert await store.find_request("mp-2") == ("a", "T")
    assert await store.task_tenants("T") == {"a", "b"}
    assert await store.task_tenants("mp-1") == {"a"}
    assert await store.task_tenants("mp-2") == set()  # a grouped request is not a task of its own
    await store.close()


async def test_replicas_starting_together_agree_on_one_salt(pg_url: str) -> None:
    replicas = [values(pg_url) for _ in range(8)]
    salts = await asyncio.gather(*(r.salt(None) for r in replicas))
    for r in replicas:
        await r.close()
    assert len(set(salts)) == 1 and len(salts[0]) == 64
    assert query(pg_url, "SELECT key, value FROM value_meta") == [("salt", salts[0])]
    later = values(pg_url)
    assert await later.salt(None) == salts[0]
    assert await later.salt("a-configured-salt-value") == "a-configured-salt-value"
    await later.close()
    assert query(pg_url, "SELECT count(*) FROM value_meta") == [(1,)]


async def test_the_leaderboard_reads_postgresql_with_the_figures_of_sqlite(
    pg_url: str, tmp_path: Path
) -> None:
    file = tmp_path / "ledger.db"
    write(file, ledger_rows(), value_rows())
    ledger_store = PostgresStore(pg_url, ledger.LEDGER_SCHEMA)
    assert await ledger_store.insert(ledger.REQUESTS, ledger_rows()) == []
    await ledger_store.close()
    await insert(pg_url, value_rows())
    for by in ("tenant", "user", "model"):
        for rank in ("usd", "joules", "successes", "success_rate"):
            from_postgres, from_sqlite = board(pg_url, by, rank), board(file, by, rank)
            assert len(from_postgres) == len(from_sqlite) > 1
            for got, expected in zip(from_postgres, from_sqlite, strict=True):
                assert got == pytest.approx(expected), (by, rank)
    rows = {r["tenant"]: r for r in board(pg_url, "tenant")}
    assert rows["burn"]["usd_per_success"] == pytest.approx(5 * 0.03)  # as in SQLite, by hand
    assert rows["good"]["tokens"] == 3 * 150 and isinstance(rows["good"]["tokens"], int)


async def test_a_postgresql_ledger_without_the_value_tables_ranks_requests_as_tasks(
    pg_url: str,
) -> None:
    store = PostgresStore(pg_url, ledger.LEDGER_SCHEMA)
    assert await store.insert(ledger.REQUESTS, ledger_rows()[:2]) == []
    await store.close()
    [row] = board(pg_url, "tenant")
    assert (row["tasks"], row["successes"], row["unrated_share"]) == (2, 0, 1.0)
    assert leaderboard.stored_salt(pg_url) is None
