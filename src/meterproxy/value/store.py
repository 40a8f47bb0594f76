"""Tasks and outcomes, stored beside the usage ledger (the same database), written off the
request path: rows queue in memory and one writer hands them in batches to one thread.

    task_requests   request key -> tenant, task id, duplicate flag: every request sent with
                    x-meterproxy-task and every duplicate (a request sent alone, and not a
                    duplicate, is its own task: the ledger's row says all there is)
    task_outcomes   tenant + task id -> success, score, metric, when; the last report wins
    value_meta      the salt that keys prompt and user hashes, when none is configured

`Storage` is what a backend implements (SQLite here). A PostgreSQL one needs the same three
tables (`ON CONFLICT` upserts as written below work there too), its driver's transient errors
raised as `StoreUnavailable`, and the salt insert made race-free across replicas
(`INSERT ... ON CONFLICT DO NOTHING`, then read back), as it is here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..storage import open_wal

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS task_requests (
    request_id TEXT PRIMARY KEY,   -- the proxy's request key (= requests.request_id)
    tenant TEXT NOT NULL,
    task_id TEXT NOT NULL,         -- x-meterproxy-task, else the request key itself
    ts REAL NOT NULL,              -- end of the request, Unix seconds
    duplicate INTEGER NOT NULL     -- 1: a repeat of a recent identical request
);
CREATE INDEX IF NOT EXISTS task_requests_task ON task_requests (task_id, tenant);
CREATE TABLE IF NOT EXISTS task_outcomes (
    tenant TEXT NOT NULL,
    task_id TEXT NOT NULL,
    success INTEGER NOT NULL,
    score REAL,
    metric TEXT,
    ts REAL NOT NULL,              -- when the last report arrived, Unix seconds
    feedback_id TEXT NOT NULL,     -- the id the last report was answered with
    reports INTEGER NOT NULL,      -- how many reports (the last one wins)
    PRIMARY KEY (tenant, task_id)
);
CREATE TABLE IF NOT EXISTS value_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
INSERT_REQUEST = (
    "INSERT INTO task_requests (request_id, tenant, task_id, ts, duplicate) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING"
)
# The last report wins (by arrival time, so a replayed older batch never overwrites a newer one).
UPSERT_OUTCOME = (
    "INSERT INTO task_outcomes (tenant, task_id, success, score, metric, ts, feedback_id, reports) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (tenant, task_id) DO UPDATE SET "
    "success = excluded.success, score = excluded.score, metric = excluded.metric, "
    "ts = excluded.ts, feedback_id = excluded.feedback_id, "
    "reports = task_outcomes.reports + 1 WHERE excluded.ts >= task_outcomes.ts"
)


@dataclass(frozen=True, slots=True)
class RequestRow:
    request_id: str
    tenant: str
    task_id: str
    ts: float
    duplicate: bool


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    tenant: str
    task_id: str
    success: bool
    score: float | None
    metric: str | None
    ts: float
    feedback_id: str


Row = RequestRow | OutcomeRow


class StoreUnavailable(Exception):
    """The database refused for now (locked, busy, full, unreachable): rows stay queued."""


class Storage(Protocol):
    """One backend, used from one worker thread at a time."""

    def open(self, salt: str | None) -> str:
        """Create the tables; return the salt in use: `salt` if given, else the stored one,
        else a new one, stored."""

    def write(self, rows: list[Row]) -> int:
        """One transaction, in order; returns how many rows could not be stored at all (and
        were skipped). Raises StoreUnavailable when the database refuses."""

    def find_request(self, request_id: str) -> tuple[str, str] | None:
        """(tenant, task id) of a stored request, from these tables or the ledger's."""

    def task_tenants(self, task_id: str) -> set[str]:
        """The tenants with a stored task of this id."""

    def close(self) -> None: ...


class SqliteStorage:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def open(self, salt: str | None) -> str:
        self._db = db = open_wal(self.path, SCHEMA)
        if salt is not None:
            return salt
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO value_meta (key, value) VALUES ('salt', ?) ON CONFLICT DO NOTHING",
                (secrets.token_hex(32),),
            )
        stored: str = db.execute("SELECT value FROM value_meta WHERE key = 'salt'").fetchone()[0]
        return stored

    def write(self, rows: list[Row]) -> int:
        db = self._connection()
        try:
            with db:
                db.execute("BEGIN")
                for row in rows:
                    db.execute(*_statement(row))
            return 0
        except sqlite3.OperationalError as exc:  # locked, busy, full, I/O: keep the rows
            raise StoreUnavailable(str(exc)) from exc
        except sqlite3.Error as exc:  # a row at fault: store the others, one by one
            log.warning("outcome store: a batch of %d rows failed (%s); row by row", len(rows), exc)
        rejected = 0
        try:
            with db:
                db.execute("BEGIN")
                for row in rows:
                    try:
                        db.execute(*_statement(row))
                    except sqlite3.OperationalError:
                        raise
                    except sqlite3.Error:
                        rejected += 1
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return rejected

    def find_request(self, request_id: str) -> tuple[str, str] | None:
        db = self._connection()
        found = db.execute(
            "SELECT tenant, task_id FROM task_requests WHERE request_id = ?", (request_id,)
        ).fetchone()
        if found is None and self._has_ledger(db):
            found = db.execute(
                "SELECT tenant, request_id FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if found is None else (str(found[0]), str(found[1]))

    def task_tenants(self, task_id: str) -> set[str]:
        db = self._connection()
        rows = db.execute(
            "SELECT DISTINCT tenant FROM task_requests WHERE task_id = ?", (task_id,)
        ).fetchall()
        tenants = {str(r[0]) for r in rows}
        if self._has_ledger(db):
            # A request sent alone is its own task, named by its key.
            alone = db.execute(
                "SELECT tenant FROM requests WHERE request_id = ? AND NOT EXISTS "
                "(SELECT 1 FROM task_requests t WHERE t.request_id = ? AND t.task_id != ?)",
                (task_id, task_id, task_id),
            ).fetchall()
            tenants.update(str(r[0]) for r in alone)
        return tenants

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable("the outcome store is not open")
        return self._db

    @staticmethod
    def _has_ledger(db: sqlite3.Connection) -> bool:
        return (
            db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests'"
            ).fetchone()
            is not None
        )


def _statement(row: Row) -> tuple[str, tuple[object, ...]]:
    if isinstance(row, RequestRow):
        return INSERT_REQUEST, (row.request_id, row.tenant, row.task_id, row.ts, int(row.duplicate))
    return UPSERT_OUTCOME, (
        row.tenant,
        row.task_id,
        int(row.success),
        row.score,
        row.metric,
        row.ts,
        row.feedback_id,
    )


class OutcomeStore:
    """The queue and its writer in front of a `Storage`; `add` never blocks or does I/O."""

    def __init__(
        self,
        storage: Storage,
        *,
        on_error: Callable[[str], None],
        max_queue: int = 200_000,
        interval_s: float = 0.1,
    ) -> None:
        self.storage = storage
        self._on_error = on_error  # "write" (rows kept), "dropped" or "invalid_row"
        self._queue: collections.deque[Row] = collections.deque()
        self._max_queue = max_queue
        self.interval_s = interval_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outcomes")

    @property
    def queued(self) -> int:
        return len(self._queue)

    def add(self, row: Row) -> None:
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._on_error("dropped")
        self._queue.append(row)

    async def open(self, salt: str | None) -> str:
        return await self._call(self.storage.open, salt)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> bool:
        """Write everything queued; False (rows kept, in order) if the database refused."""
        if not self._queue:
            return True
        batch = list(self._queue)
        self._queue.clear()
        try:
            rejected = await self._call(self.storage.write, batch)
        except StoreUnavailable as exc:
            self._queue.extendleft(reversed(batch))
            while len(self._queue) > self._max_queue:
                self._queue.pop()
                self._on_error("dropped")
            self._on_error("write")
            log.error(
                "outcome store: write of %d rows failed (%s); they stay queued", len(batch), exc
            )
            return False
        for _ in range(rejected):
            self._on_error("invalid_row")
        if rejected:
            log.error("outcome store: %d rows could not be stored; dropped", rejected)
        return True

    async def find_request(self, request_id: str) -> tuple[str, str] | None:
        return await self._call(self.storage.find_request, request_id)

    async def task_tenants(self, task_id: str) -> set[str]:
        return await self._call(self.storage.task_tenants, task_id)

    async def close(self) -> None:
        await self.flush()
        await self._call(self.storage.close)
        self._thread.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
