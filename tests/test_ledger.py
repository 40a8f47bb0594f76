"""The ledger: batched, durable within 200 ms, failures counted with rows kept."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from meterproxy.ledger import LEDGER_SCHEMA, Ledger
from meterproxy.settlement import Settlement
from meterproxy.store.sqlite import SqliteStore
from meterproxy.usage import Source, Usage

from .factories import settlement


def sqlite_ledger(path: Path | str, **options: Any) -> Ledger:
    return Ledger(SqliteStore(str(path), LEDGER_SCHEMA), **options)


def record(i: int) -> Settlement:
    return settlement(request_id=f"r{i}", usage=Usage(10, i, 0, None, Source.UPSTREAM))


def rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT request_id, completion_tokens, reasoning_tokens, cost_usd "
            "FROM requests ORDER BY id"
        ).fetchall()


async def test_rows_are_durable_within_200_ms(tmp_path: Path) -> None:
    errors: list[str] = []
    ledger = sqlite_ledger(tmp_path / "l.db", on_error=errors.append)
    await ledger.open()
    writer = asyncio.create_task(ledger.run())
    for i in range(50):
        ledger.add(record(i))
    await asyncio.sleep(0.2)
    assert len(rows(tmp_path / "l.db")) == 50  # read by another connection: committed
    assert rows(tmp_path / "l.db")[3] == ("r3", 3, None, 0.001)  # unknown stays NULL
    writer.cancel()
    await ledger.close()
    assert errors == []


async def test_a_locked_database_is_counted_and_rows_wait(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    errors: list[str] = []
    ledger = sqlite_ledger(path, on_error=errors.append)
    await ledger.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    ledger.add(record(1))
    assert await ledger.flush() is False
    assert errors == ["write"] and ledger.queued == 1
    blocker.execute("ROLLBACK")
    blocker.close()
    ledger.add(record(2))
    assert await ledger.flush() is True
    assert [r[0] for r in rows(path)] == ["r1", "r2"]
    await ledger.close()


async def test_the_queue_is_bounded_and_drops_are_counted(tmp_path: Path) -> None:
    errors: list[str] = []
    ledger = sqlite_ledger(tmp_path / "l.db", on_error=errors.append, max_queue=3)
    for i in range(5):
        ledger.add(record(i))
    assert ledger.queued == 3 and errors == ["dropped", "dropped"]
    await ledger.open()
    await ledger.close()
    assert [r[0] for r in rows(tmp_path / "l.db")] == ["r2", "r3", "r4"]


async def test_unstorable_values_are_made_storable_and_a_bad_row_never_stops_the_rest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "l.db"
    errors: list[str] = []
    ledger = sqlite_ledger(path, on_error=errors.append)
    await ledger.open()
    writer = asyncio.create_task(ledger.run())
    ledger.add(settlement(request_id="r1", client_request_id="id-\udcff-bad"))  # lone surrogate
    ledger.add(settlement(request_id="r2", usage=Usage(2**63, 2**70, None, None, Source.UPSTREAM)))
    ledger.add(settlement(request_id="r3", client_user="x" * 100_000))
    ledger.add(settlement(request_id="r4", tenant=None))  # type: ignore[arg-type]  # NOT NULL
    ledger.add(settlement(request_id="r5"))
    await asyncio.sleep(0.3)
    with sqlite3.connect(path) as db:
        stored = db.execute(
            "SELECT request_id, client_request_id, prompt_tokens, completion_tokens, "
            "length(client_user) FROM requests ORDER BY id"
        ).fetchall()
    assert [r[0] for r in stored] == ["r1", "r2", "r3", "r5"]  # r4 alone is lost, and counted
    assert stored[0][1] == "id-?-bad"  # undecodable: replaced, never raised
    assert stored[1][2:4] == (2**63 - 1, 2**63 - 1)
    assert stored[2][4] == 256
    assert errors == ["invalid_row"]
    ledger.add(settlement(request_id="r6"))  # the writer is alive: later rows are written
    await asyncio.sleep(0.3)
    assert [r[0] for r in rows(path)][-1] == "r6"
    writer.cancel()
    await ledger.close()


async def test_a_retried_batch_never_doubles_a_row(tmp_path: Path) -> None:
    ledger = sqlite_ledger(tmp_path / "l.db", on_error=lambda kind: None)
    await ledger.open()
    ledger.add(record(1))
    ledger.add(record(1))  # the same request key again, e.g. a batch retried after a timeout
    await ledger.close()
    assert [r[0] for r in rows(tmp_path / "l.db")] == ["r1"]


async def test_a_version_1_ledger_is_migrated_in_place(tmp_path: Path) -> None:
    from meterproxy.ledger import SCHEMA, SCHEMA_VERSION

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        old = (
            "INSERT INTO requests (request_id, ts, tenant, model, upstream, endpoint, status, "
            "token_source, duration_s, gpu_seconds, cost_usd, priced) "
            "VALUES ('client-7', 1, 't', 'm', 'u', 'chat_completions', '200', 'upstream', "
            "1, 0, 0, 0)"
        )
        db.execute(old)
        db.execute(old)  # version 1 keyed rows by the client's id, which may repeat
    db.close()
    ledger = sqlite_ledger(path, on_error=lambda kind: None)
    await ledger.open()
    ledger.add(record(1))
    await ledger.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        got = db.execute("SELECT request_id, outcome FROM requests ORDER BY id").fetchall()
    db.close()
    assert got == [("client-7", None), ("client-7#2", None), ("r1", "success")]
