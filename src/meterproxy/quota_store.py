"""Day and month spend survive a restart: the quota's settled amounts, saved to SQLite (WAL)
once a second and at shutdown, and loaded at startup for the current periods."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from .quota import Quota
from .storage import open_wal, writer_thread

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,      -- tokens | usd | joules
    period TEXT NOT NULL,    -- 2026-11-22 (day) or 2026-11 (month), in the quota time zone
    used REAL NOT NULL,
    PRIMARY KEY (tenant, kind, period)
);
"""


class QuotaStore:
    def __init__(self, path: str, quota: Quota, interval_s: float = 1.0) -> None:
        self.path, self.quota, self.interval_s = path, quota, interval_s
        self._thread = writer_thread("quota-store")
        self._db: sqlite3.Connection | None = None

    async def open(self, now_s: float) -> None:
        """Load the spend of the current day and month."""
        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._thread, lambda: open_wal(self.path, SCHEMA))
        day, month, _, _ = self.quota.periods(now_s)
        rows = await loop.run_in_executor(self._thread, self._load, (day, month))
        for tenant, kind, period, used in rows:
            self.quota.state(tenant).spend[(kind, period)] = used
        log.info("quota state: %s (%d tenant budgets restored)", self.path, len(rows))

    def _load(self, periods: tuple[str, str]) -> list[tuple[str, str, str, float]]:
        assert self._db is not None
        return self._db.execute(
            "SELECT tenant, kind, period, used FROM spend WHERE period IN (?, ?)", periods
        ).fetchall()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.save()

    async def save(self) -> None:
        dirty, self.quota.dirty = self.quota.dirty, set()
        if not dirty or self._db is None:
            return
        rows = [(t, k, p, self.quota.state(t).spend.get((k, p), 0.0)) for t, k, p in dirty]
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._write, rows)
        except sqlite3.Error as exc:
            self.quota.dirty |= dirty  # try again next time
            log.error("quota state %s: save failed (%s); will retry", self.path, exc)

    def _write(self, rows: list[tuple[str, str, str, float]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO spend (tenant, kind, period, used) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tenant, kind, period) DO UPDATE SET used = excluded.used",
                rows,
            )

    async def close(self) -> None:
        await self.save()
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=True)
