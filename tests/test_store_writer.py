"""The shared writer, on real SQLite files: a store that refuses keeps its rows and is retried
with a backoff; a full queue spills to a local file that is drained, each row stored once, when
the store takes rows again; close spills what the store did not take, and the next run drains
it; rows are lost (and counted) only when the spill file fails too."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from meterproxy.ledger import LEDGER_SCHEMA, Ledger
from meterproxy.store.sqlite import SqliteStore
from meterproxy.usage import Source, Usage

from .factories import settlement


class Locked:
    """Another process holding the SQLite ledger's write lock: the store refuses meanwhile."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


def keys(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        found = [r[0] for r in db.execute("SELECT request_id FROM requests ORDER BY id")]
    db.close()
    return found


def ledger(tmp_path: Path, errors: list[str], spilled: list[int], **options: object) -> Ledger:
    return Ledger(
        SqliteStore(str(tmp_path / "ledger.db"), LEDGER_SCHEMA),
        spill=SqliteStore(str(tmp_path / "spill.db"), LEDGER_SCHEMA),
        on_error=errors.append,
        on_spilled=spilled.append,
        **options,  # type: ignore[arg-type]
    )


def add(target: Ledger, first: int, n: int, ts: float = 1.7e9) -> None:
    for i in range(first, first + n):
        target.add(
            settlement(request_id=f"r{i}", ts=ts, usage=Usage(1, i, 0, None, Source.UPSTREAM))
        )


async def test_a_full_queue_spills_and_the_spill_drains_once_the_store_is_back(
    tmp_path: Path,
) -> None:
    errors: list[str] = []
    spilled: list[int] = []
    clock = [1.7e9 + 30]
    w = ledger(tmp_path, errors, spilled, max_queue=5, batch_rows=4, clock=lambda: clock[0])
    await w.open()
    assert not (tmp_path / "spill.db").exists()  # created only when a row needs it
    lock = Locked(tmp_path / "ledger.db")
    add(w, 0, 23)
    assert w.queued == 23  # 5 queued, 18 on their way to the spill file; nothing dropped
    assert await w.flush() is False
    assert (w.queued, w.spilled, sum(spilled)) == (5, 18, 18)
    assert w.backlog_age_s() == 30.0
    assert errors == ["write"]
    lock.release()
    for _ in range(10):  # one spill batch (4 rows) drained per flush, after the queue
        await w.flush()
    assert (w.queued, w.spilled) == (0, 0) and w.backlog_age_s() == 0.0
    assert sorted(keys(tmp_path / "ledger.db")) == sorted(f"r{i}" for i in range(23))
    assert keys(tmp_path / "spill.db") == []
    assert errors == ["write"]
    await w.close()


async def test_close_spills_what_the_store_refused_and_the_next_run_drains_it(
    tmp_path: Path,
) -> None:
    errors: list[str] = []
    first = ledger(tmp_path, errors, [])
    await first.open()
    lock = Locked(tmp_path / "ledger.db")
    add(first, 0, 7)
    await first.close()  # the store refuses: the 7 rows go to the spill file
    assert errors == ["write"] and len(keys(tmp_path / "spill.db")) == 7
    lock.release()
    second = ledger(tmp_path, errors, [])
    await second.open()
    assert second.spilled == 7  # found at start, drained by the writer
    add(second, 7, 3)
    assert await second.flush() is True
    assert sorted(keys(tmp_path / "ledger.db")) == sorted(f"r{i}" for i in range(10))
    assert second.spilled == 0
    await second.close()


async def test_a_row_drained_twice_is_stored_once(tmp_path: Path) -> None:
    """A crash between the store's commit and the spill file's delete leaves the rows in both;
    the next drain sends them again and the store's key skips them."""
    w = ledger(tmp_path, [], [], max_queue=1)
    await w.open()
    add(w, 0, 3)
    assert await w.flush() is True  # r0 from the queue; r1, r2 spilled then drained
    spill = sqlite3.connect(tmp_path / "spill.db")
    spill.execute("ATTACH DATABASE ? AS ledger", (str(tmp_path / "ledger.db"),))
    with spill:  # as if the delete after r1's drain had not happened
        spill.execute("INSERT INTO requests SELECT * FROM ledger.requests WHERE request_id = 'r1'")
    spill.close()
    w2 = ledger(tmp_path, [], [])
    await w2.open()
    assert w2.spilled == 1
    assert await w2.flush() is True
    assert sorted(keys(tmp_path / "ledger.db")) == ["r0", "r1", "r2"] and w2.spilled == 0
    await w.close()
    await w2.close()


async def test_a_refusing_store_is_retried_with_a_backoff(tmp_path: Path) -> None:
    errors: list[str] = []
    w = ledger(tmp_path, errors, [], interval_s=0.01, retry_max_s=0.2)
    await w.open()
    lock = Locked(tmp_path / "ledger.db")
    add(w, 0, 1)
    writer = asyncio.create_task(w.run())
    await asyncio.sleep(1.5)
    # Every 10 ms would be ~150 attempts (each waits 1 s for the lock); with the backoff,
    # at most a handful.
    assert 1 <= errors.count("write") <= 6
    lock.release()
    await asyncio.sleep(0.5)
    assert keys(tmp_path / "ledger.db") == ["r0"]
    writer.cancel()
    await w.close()


async def test_the_interval_flush_writes_what_was_queued_when_it_began(tmp_path: Path) -> None:
    """Rows that arrive while a batch is being written wait for the next interval: one
    transaction an interval, not a chain of small ones behind a busy proxy."""
    w = ledger(tmp_path, [], [], interval_s=0.05)
    await w.open()
    batches: list[int] = []
    insert = w.store.insert

    async def busy(table: object, rows: list[object]) -> object:
        batches.append(len(rows))
        add(w, 1000 + len(batches) * 10, 3)  # the proxy settles more meanwhile
        return await insert(table, rows)  # type: ignore[arg-type]

    w.store.insert = busy  # type: ignore[method-assign]
    add(w, 0, 100)
    assert await w.flush(whole=False)
    assert batches == [100] and w.queued == 3  # the 3 that came during the write wait
    writer = asyncio.create_task(w.run())
    await asyncio.sleep(0.3)
    writer.cancel()
    # An interval each (~6 in 0.3 s), where draining until empty would never stop writing.
    assert 3 <= len(batches) <= 10 and set(batches[1:]) == {3}
    w.store.insert = insert  # type: ignore[method-assign]
    assert await w.flush()  # an explicit flush writes until nothing is left
    assert w.queued == 0 and len(keys(tmp_path / "ledger.db")) == 100 + 3 * len(batches)
    await w.close()


async def test_rows_are_lost_and_counted_only_when_the_spill_file_fails_too(
    tmp_path: Path,
) -> None:
    errors: list[str] = []
    (tmp_path / "spill.db").mkdir()  # the spill file cannot be created
    w = ledger(tmp_path, errors, [], max_queue=2, max_spill_buffer=2)
    await w.open()
    lock = Locked(tmp_path / "ledger.db")
    add(w, 0, 6)  # 2 queued, 4 for the spill file, of which 2 fit in its memory buffer
    assert errors == ["spill", "dropped", "dropped"]  # the spill file failed at open already
    assert await w.flush() is False
    assert w.queued == 4 and errors.count("write") == 1 and errors.count("dropped") == 2
    lock.release()
    assert await w.flush() is True
    assert keys(tmp_path / "ledger.db") == ["r0", "r1"]
    await w.close()
    assert errors.count("dropped") == 4  # the two that waited for the spill, at close
