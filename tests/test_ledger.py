"""The ledger: batched, durable within 200 ms, failures counted with rows kept."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from meterproxy.ledger import Ledger
from meterproxy.meter import Record
from meterproxy.usage import Source, Usage


def record(i: int) -> Record:
    return Record(
        request_id=f"r{i}",
        endpoint="chat_completions",
        started_ns=0,
        ended_ns=10**9,
        model="m",
        upstream="u",
        status="200",
        reached_upstream=True,
        usage=Usage(10, i, 0, None, Source.UPSTREAM),
        cost_usd=0.001,
    )


def rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT request_id, completion_tokens, reasoning_tokens, cost_usd "
            "FROM requests ORDER BY id"
        ).fetchall()


async def test_rows_are_durable_within_200_ms(tmp_path: Path) -> None:
    errors: list[str] = []
    ledger = Ledger(str(tmp_path / "l.db"), wall_clock=lambda: 1.7e9, on_error=errors.append)
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
    ledger = Ledger(str(path), wall_clock=lambda: 1.7e9, on_error=errors.append)
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
    ledger = Ledger(
        str(tmp_path / "l.db"), wall_clock=lambda: 1.7e9, on_error=errors.append, max_queue=3
    )
    for i in range(5):
        ledger.add(record(i))
    assert ledger.queued == 3 and errors == ["dropped", "dropped"]
    await ledger.open()
    await ledger.close()
    assert [r[0] for r in rows(tmp_path / "l.db")] == ["r2", "r3", "r4"]
