"""The outcome store on a real SQLite file: its tables beside the ledger's, the last report
winning, lookups through the ledger's rows, and a locked database keeping the rows queued."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from meterproxy import ledger
from meterproxy.store.sqlite import connect, insert_sql
from meterproxy.value.store import OutcomeRow, OutcomeStore, RequestRow, SqliteStorage

from .factories import settlement


def outcome(task: str, success: bool, ts: float, fid: str = "f") -> OutcomeRow:
    return OutcomeRow("a", task, success, None, None, ts, fid)


def test_the_salt_is_made_once_and_kept_and_a_configured_one_is_not_stored(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    first = SqliteStorage(path)
    salt = first.open(None)
    first.close()
    again = SqliteStorage(path)
    assert again.open(None) == salt and len(salt) == 64
    assert again.open("configured-salt-value") == "configured-salt-value"
    again.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM value_meta").fetchall() == [(salt,)]


def test_the_last_report_wins_and_each_is_counted(tmp_path: Path) -> None:
    storage = SqliteStorage(str(tmp_path / "ledger.db"))
    storage.open(None)
    assert storage.write([outcome("T", True, 10.0, "f1"), outcome("T", False, 11.0, "f2")]) == 0
    storage.write([outcome("T", True, 9.0, "replayed")])  # an older report never overwrites
    storage.write([RequestRow("r1", "a", "T", 1.0, False), RequestRow("r1", "a", "T", 1.0, False)])
    db = sqlite3.connect(storage.path)
    assert db.execute("SELECT success, ts, feedback_id, reports FROM task_outcomes").fetchall() == [
        (0, 11.0, "f2", 2)
    ]
    assert db.execute("SELECT count(*) FROM task_requests").fetchone() == (1,)


def test_requests_are_found_in_these_tables_or_the_ledgers(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    storage = SqliteStorage(path)
    storage.open(None)
    assert storage.find_request("mp-1") is None and storage.task_tenants("T") == set()
    db = connect(path, ledger.LEDGER_SCHEMA)  # the ledger's own table, as the proxy writes it
    for key, tenant in (("mp-1", "a"), ("mp-2", "a"), ("mp-3", "b")):
        db.execute(
            insert_sql(ledger.REQUESTS), ledger.row(settlement(request_id=key, tenant=tenant))
        )
    storage.write(
        [RequestRow("mp-2", "a", "T", 1.0, False), RequestRow("mp-3", "b", "T", 1.0, True)]
    )
    assert storage.find_request("mp-1") == ("a", "mp-1")  # sent alone: its own task
    assert storage.find_request("mp-2") == ("a", "T")
    assert storage.task_tenants("T") == {"a", "b"}
    assert storage.task_tenants("mp-1") == {"a"}
    assert storage.task_tenants("mp-2") == set()  # a grouped request is not a task of its own


async def test_a_locked_database_keeps_the_rows_queued_in_order(tmp_path: Path) -> None:
    errors: list[str] = []
    store = OutcomeStore(SqliteStorage(str(tmp_path / "ledger.db")), on_error=errors.append)
    await store.open(None)
    store.add(outcome("T", True, 1.0, "first"))
    store.add(outcome("T", False, 2.0, "second"))
    blocker = sqlite3.connect(str(tmp_path / "ledger.db"), timeout=0, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    assert not await store.flush()
    assert errors == ["write"] and store.queued == 2
    blocker.execute("ROLLBACK")
    assert await store.flush() and store.queued == 0
    await store.close()
    db = sqlite3.connect(str(tmp_path / "ledger.db"))
    assert db.execute("SELECT feedback_id, reports FROM task_outcomes").fetchall() == [
        ("second", 2)
    ]


async def test_a_full_queue_drops_the_oldest_and_says_so(tmp_path: Path) -> None:
    errors: list[str] = []
    store = OutcomeStore(
        SqliteStorage(str(tmp_path / "ledger.db")), on_error=errors.append, max_queue=2
    )
    for i in range(3):
        store.add(RequestRow(f"r{i}", "a", "T", 1.0, False))
    assert errors == ["dropped"] and store.queued == 2
    await store.open(None)
    await store.close()
    db = sqlite3.connect(str(tmp_path / "ledger.db"))
    assert db.execute("SELECT request_id FROM task_requests").fetchall() == [("r1",), ("r2",)]
