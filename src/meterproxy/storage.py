"""SQLite files the proxy writes (ledger, quota state): WAL mode, so a killed process leaves a
consistent file and readers never block the writer."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_wal(path: str, schema: str) -> sqlite3.Connection:
    """Open (creating it and its folder if needed) with the schema applied. One thread uses it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=1.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of the process
    db.executescript(schema)
    return db
