"""The value tables on a real SQLite file, through the shared writer: beside the ledger's table
in its file, with their own schema version; the last report winning (a replayed report counted
once); lookups through the ledger's rows; a locked database keeping the rows queued; a full
queue spilling (or, without a spill file, dropping the oldest); a newer schema refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from meterproxy import ledger
from meterproxy.store.base import StoreUnavailable
from meterproxy.store.sqlite import SqliteStore, connect, insert_sql
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


def outcome(task: str, success: bool, ts: float, fid: str = "f") -> OutcomeRow:
    return OutcomeRow("a", task, success, None, None, ts, fid)


def values(path: Path, errors: list[str] | None = None, **options: object) -> ValueStore:
    return value_store(
        f"sqlite:///{path}",
        options.pop("spill_path", None),  # type: ignore[arg-type]
        on_error=(errors if errors is not None else []).append,
        **options,  # type: ignore[arg-type]
    )


def select(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def test_the_salt_is_made_once_and_kept_and_a_configured_one_is_not_stored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    first = values(path)
    await first.open()
    salt = await first.salt(None)
    await first.close()
    again = values(path)
    assert await again.salt(None) == salt and len(salt) == 64
    assert await again.salt("configured-salt-value") == "configured-salt-value"
    await again.close()
    assert select(path, "SELECT value FROM value_meta") == [(salt,)]


async def test_the_last_report_wins_and_each_is_counted_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = values(path)
    await store.open()
    store.add(outcome("T", True, 10.0, "f1"))
    store.add(outcome("T", False, 11.0, "f2"))
    assert await store.flush()
    store.add(outcome("T", True, 9.0, "replayed"))  # an older report never overwrites
    store.add(outcome("T", False, 11.0, "f2"))  # the same report again (a retried batch)
    store.add(RequestRow("r1", "a", "T", 1.0, False))
    store.add(RequestRow("r1", "a", "T", 1.0, False))
    assert await store.flush()
    await store.close()
    assert select(path, "SELECT success, ts, feedback_id, reports FROM task_outcomes") == [
        (0, 11.0, "f2", 2)
    ]
    assert select(path, "SELECT count(*) FROM task_requests") == [(1,)]


async def test_the_tables_share_the_ledger_file_each_schema_with_its_version(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    connect(str(path), ledger.LEDGER_SCHEMA).close()
    store = values(path)
    await store.open()
    await store.close()
    assert select(path, "PRAGMA user_version") == [(ledger.SCHEMA_VERSION,)]  # the ledger's
    assert select(path, "SELECT component, version FROM schema_version") == [("value", 1)]
    tables = {name for (name,) in select(path, "SELECT name FROM sqlite_master")}
    assert {"requests", "task_requests", "task_outcomes", "value_meta"} <= tables


async def test_a_ledger_with_the_first_unversioned_value_tables_keeps_their_rows(
    tmp_path: Path,
) -> None:
    """Files written before the value tables had a version: the tables are the version-1 ones,
    so they are adopted as they are, rows and salt included."""
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path, isolation_level=None)
    for statement in VALUE_SCHEMA.sqlite[0][1]:
        db.execute(statement)
    db.execute("INSERT INTO value_meta VALUES ('salt', 'the-salt-of-an-older-proxy')")
    db.execute("INSERT INTO task_outcomes VALUES ('a', 'T', 1, NULL, NULL, 5.0, 'f0', 1)")
    db.close()
    store = values(path)
    await store.open()
    assert await store.salt(None) == "the-salt-of-an-older-proxy"
    store.add(outcome("T", False, 6.0, "f1"))
    await store.close()
    assert select(path, "SELECT feedback_id, reports FROM task_outcomes") == [("f1", 2)]
    assert select(path, "SELECT version FROM schema_version") == [(1,)]


async def test_requests_are_found_in_these_tables_or_the_ledgers(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = values(path)
    await store.open()
    assert await store.find_request("mp-1") is None and await store.task_tenants("T") == set()
    db = connect(str(path), ledger.LEDGER_SCHEMA)  # the ledger's own table, as the proxy writes it
    for key, tenant in (("mp-1", "a"), ("mp-2", "a"), ("mp-3", "b")):
        db.execute(
            insert_sql(ledger.REQUESTS), ledger.row(settlement(request_id=key, tenant=tenant))
        )
    db.close()
    store.add(RequestRow("mp-2", "a", "T", 1.0, False))
    store.add(RequestRow("mp-3", "b", "T", 1.0, True))
    assert await store.flush()
    assert await store.find_request("mp-1") == ("a", "mp-1")  # sent alone: its own task
    assert await store.find_request("mp-2") == ("a", "T")
    assert await store.task_tenants("T") == {"a", "b"}
    assert await store.task_tenants("mp-1") == {"a"}
    assert await store.task_tenants("mp-2") == set()  # a grouped request is not a task of its own
    await store.close()


async def test_a_locked_database_keeps_the_rows_queued_in_order(tmp_path: Path) -> None:
    errors: list[str] = []
    path = tmp_path / "ledger.db"
    store = values(path, errors)
    await store.open()
    store.add(outcome("T", True, 1.0, "first"))
    store.add(outcome("T", False, 2.0, "second"))
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    assert not await store.flush()
    assert errors == ["write"] and store.queued == 2
    blocker.execute("ROLLBACK")
    blocker.close()
    assert await store.flush() and store.queued == 0
    await store.close()
    assert select(path, "SELECT feedback_id, reports FROM task_outcomes") == [("second", 2)]


async def test_a_full_queue_drops_the_oldest_and_says_so_without_a_spill_file(
    tmp_path: Path,
) -> None:
    errors: list[str] = []
    path = tmp_path / "ledger.db"
    store = values(path, errors, max_queue=2)
    for i in range(3):
        store.add(RequestRow(f"r{i}", "a", "T", 1.0, False))
    assert errors == ["dropped"] and store.queued == 2
    await store.open()
    await store.close()
    assert select(path, "SELECT request_id FROM task_requests") == [("r1",), ("r2",)]


async def test_a_full_queue_spills_and_the_next_run_drains_every_row_once(
    tmp_path: Path,
) -> None:
    """The database unavailable (a directory where the file should be), the queue full: rows
    beyond it go to the spill file (the ledger's, beside its own rows), the rest too at close;
    the next start drains them, the reports merged by the same upsert in the spill file and
    again in the database."""
    errors: list[str] = []
    path, spill = tmp_path / "ledger.db", tmp_path / "spill.db"
    connect(str(spill), ledger.LEDGER_SCHEMA).close()  # the ledger's spill file, already there
    path.mkdir()
    store = values(path, errors, spill_path=str(spill), max_queue=2)
    await store.open()
    for i in range(4):
        store.add(RequestRow(f"r{i}", "a", "T", float(i), i % 2 == 1))
    store.add(outcome("T", True, 1.0, "f1"))
    store.add(outcome("T", False, 2.0, "f2"))
    assert not await store.flush()
    await store.close()  # what the database did not take is spilled
    assert "dropped" not in errors and "write" in errors
    spilled = SqliteStore(str(spill), VALUE_SCHEMA)
    assert len(await spilled.take(TASK_REQUESTS, 100)) == 4
    assert await spilled.take(TASK_OUTCOMES, 100) == [("a", "T", 0, None, None, 2.0, "f2", 2)]
    await spilled.close()

    path.rmdir()
    db = connect(str(path), VALUE_SCHEMA)  # an earlier report, stored by another replica
    db.execute(insert_sql(TASK_OUTCOMES), outcome("T", True, 0.5, "f0").row())
    db.close()
    again = values(path, errors, spill_path=str(spill))
    await again.open()
    assert await again.flush()  # one batch of each spill table per flush
    await again.close()
    assert select(path, "SELECT request_id, duplicate FROM task_requests ORDER BY ts") == [
        ("r0", 0),
        ("r1", 1),
        ("r2", 0),
        ("r3", 1),
    ]
    assert select(path, "SELECT success, feedback_id, reports FROM task_outcomes") == [(0, "f2", 3)]
    assert select(spill, "SELECT count(*) FROM task_requests") == [(0,)]
    assert select(spill, "SELECT count(*) FROM task_outcomes") == [(0,)]


async def test_a_value_schema_from_a_newer_meterproxy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    first = values(path)
    await first.open()
    await first.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE schema_version SET version = 2 WHERE component = 'value'")
    db.close()
    errors: list[str] = []
    behind = values(path, errors)
    await behind.open()  # refused, counted, retried by the writers
    assert errors == ["write", "write"]
    with pytest.raises(StoreUnavailable, match=r"value schema is at version 2.*up to 1"):
        await behind.salt(None)
    await behind.close()
