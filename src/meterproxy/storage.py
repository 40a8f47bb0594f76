"""SQLite files the proxy writes (ledger, quota state): WAL mode, so a killed process leaves a
consistent file and readers never block the writer; each written by one background thread that
yields the CPU to the event loop."""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)
# How much lower than the loop's a writer thread's CPU priority is (Linux nice levels): when the
# two want the same core, the loop's requests go first. A transaction of a few hundred rows takes
# the thread a few milliseconds; at the loop's priority it held a request arriving meanwhile
# for about that long (the ledger's flush, ten times a second, was the p99 at one request in
# flight). At +10 the thread still gets ~10 % of a core the loop keeps busy, several times what
# a few thousand rows a second need (+5 helped the p99 less, +0 not at all). The cost: on a host
# whose CPUs other processes saturate, the thread waits longer for a core, and with it the rows
# (and a loop that wants the GIL while the thread holds it binding a row).
WRITER_NICE = 10


def writer_thread(name: str) -> ThreadPoolExecutor:
    """One thread for one SQLite connection, below the loop's priority where threads have their
    own (Linux); elsewhere at the process's."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_lower_priority)


def _lower_priority() -> None:
    if sys.platform != "linux":  # elsewhere the nice value is the whole process's
        return
    try:
        # `who` 0 is the calling thread on Linux (nice is a per-thread attribute there).
        nice = os.getpriority(os.PRIO_PROCESS, 0) + WRITER_NICE
        os.setpriority(os.PRIO_PROCESS, 0, min(nice, 19))
    except OSError as exc:  # a sandbox that forbids it: the thread runs at the loop's priority
        log.debug("could not lower a writer thread's priority: %s", exc)


def open_wal(path: str, schema: str) -> sqlite3.Connection:
    """Open (creating it and its folder if needed) with the schema applied. One thread uses it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=1.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of the process
    db.executescript(schema)
    return db
