"""SQLite files and their writer threads: a writer thread yields the CPU to the event loop (a
lower nice level on Linux, where each thread has its own), and the loop's own is unchanged."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meterproxy.ledger import LEDGER_SCHEMA
from meterproxy.quota import Quota
from meterproxy.quota_store import QuotaStore
from meterproxy.storage import WRITER_NICE, open_wal, writer_thread
from meterproxy.store.sqlite import SqliteStore


def nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def _may_lower() -> bool:
    """Whether this sandbox lets a thread lower its own priority (the code carries on at the
    loop's priority where it may not)."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(lambda: os.setpriority(os.PRIO_PROCESS, 0, nice())).exception() is None
    finally:
        pool.shutdown()


linux_only = pytest.mark.skipif(
    sys.platform != "linux" or not _may_lower(),
    reason="per-thread nice levels are Linux's (and this sandbox must allow setpriority)",
)


@linux_only
def test_a_writer_thread_runs_below_the_loops_priority() -> None:
    before = nice()
    pool = writer_thread("test")
    try:
        assert pool.submit(nice).result() == min(before + WRITER_NICE, 19)
    finally:
        pool.shutdown()
    assert nice() == before  # the calling thread (the loop's) keeps its own


@linux_only
async def test_the_ledger_and_quota_stores_write_from_such_a_thread(tmp_path: Path) -> None:
    expected = min(nice() + WRITER_NICE, 19)
    ledger = SqliteStore(str(tmp_path / "ledger.db"), LEDGER_SCHEMA)
    await ledger.open()
    quota = QuotaStore(str(tmp_path / "quota.db"), Quota("UTC"))
    loop = asyncio.get_running_loop()
    try:
        assert await ledger._call(nice) == expected
        assert await loop.run_in_executor(quota._thread, nice) == expected
    finally:
        await ledger.close()
        quota._thread.shutdown()


def test_open_wal_creates_the_folder_and_uses_write_ahead_logging(tmp_path: Path) -> None:
    db = open_wal(str(tmp_path / "a" / "b.db"), "CREATE TABLE t (x INTEGER);")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("INSERT INTO t VALUES (1)")
    finally:
        db.close()
    with sqlite3.connect(tmp_path / "a" / "b.db") as check:
        assert check.execute("SELECT x FROM t").fetchall() == [(1,)]
    check.close()
