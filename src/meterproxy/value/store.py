"""Tasks and outcomes, stored beside the usage ledger in the same database (its SQLite file, or
its PostgreSQL), written off the request path by the shared writer (`store.writer`), one per
table: batched, kept through an outage, spilled to the ledger's spill file when the queue is
full, each row stored once.

    task_requests   request key -> tenant, task id, duplicate flag: every request sent with
                    x-meterproxy-task and every duplicate (a request sent alone, and not a
                    duplicate, is its own task: the ledger's row says all there is)
    task_outcomes   tenant + task id -> success, score, metric, when, how many reports: the
                    last report wins (an upsert; a replayed older report never overwrites)
    value_meta      the salt that keys prompt and user hashes, when none is configured: the
                    first replica to insert it wins, and every replica reads that one back
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..store.base import Database, open_store
from ..store.schema import Column, Kind, Row, Schema, Table, Upsert
from ..store.sqlite import SqliteStore
from ..store.writer import Writer

_SQLITE_V1 = (
    # As the first value tables were created (before they had a version): kept as they are.
    """CREATE TABLE IF NOT EXISTS task_requests (
    request_id TEXT PRIMARY KEY,   -- the proxy's request key (= requests.request_id)
    tenant TEXT NOT NULL,
    task_id TEXT NOT NULL,         -- x-meterproxy-task, else the request key itself
    ts REAL NOT NULL,              -- end of the request, Unix seconds
    duplicate INTEGER NOT NULL     -- 1: a repeat of a recent identical request
)""",
    "CREATE INDEX IF NOT EXISTS task_requests_task ON task_requests (task_id, tenant)",
    """CREATE TABLE IF NOT EXISTS task_outcomes (
    tenant TEXT NOT NULL,
    task_id TEXT NOT NULL,
    success INTEGER NOT NULL,
    score REAL,
    metric TEXT,
    ts REAL NOT NULL,              -- when the last report arrived, Unix seconds
    feedback_id TEXT NOT NULL,     -- the id the last report was answered with
    reports INTEGER NOT NULL,      -- how many reports (the last one wins)
    PRIMARY KEY (tenant, task_id)
)""",
    "CREATE TABLE IF NOT EXISTS value_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_POSTGRES_V1 = (
    """CREATE TABLE IF NOT EXISTS task_requests (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    task_id TEXT NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    duplicate BOOLEAN NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS task_requests_task ON task_requests (task_id, tenant)",
    """CREATE TABLE IF NOT EXISTS task_outcomes (
    tenant TEXT NOT NULL,
    task_id TEXT NOT NULL,
    success BOOLEAN NOT NULL,
    score DOUBLE PRECISION,
    metric TEXT,
    ts TIMESTAMPTZ NOT NULL,
    feedback_id TEXT NOT NULL,
    reports BIGINT NOT NULL,
    PRIMARY KEY (tenant, task_id)
)""",
    "CREATE TABLE IF NOT EXISTS value_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
T = Kind.TEXT
TASK_REQUESTS = Table(
    "task_requests",
    (
        Column("request_id", T),
        Column("tenant", T),
        Column("task_id", T),
        Column("ts", Kind.TIME),
        Column("duplicate", Kind.BOOL),
    ),
    key=("request_id",),
    time="ts",
)
# The last report wins, by arrival time; `reports` counts them, each once (feedback_id).
TASK_OUTCOMES = Table(
    "task_outcomes",
    (
        Column("tenant", T),
        Column("task_id", T),
        Column("success", Kind.BOOL),
        Column("score", Kind.REAL),
        Column("metric", T),
        Column("ts", Kind.TIME),
        Column("feedback_id", T),
        Column("reports", Kind.INT),
    ),
    key=("tenant", "task_id"),
    time="ts",
    upsert=Upsert(newer="ts", same="feedback_id", count="reports"),
)
VALUE_META = Table("value_meta", (Column("key", T), Column("value", T)), key=("key",))
VALUE_SCHEMA = Schema(
    "value",
    (TASK_REQUESTS, TASK_OUTCOMES, VALUE_META),
    sqlite=((1, _SQLITE_V1),),
    postgres=((1, _POSTGRES_V1),),
)


@dataclass(frozen=True, slots=True)
class RequestRow:
    request_id: str
    tenant: str
    task_id: str
    ts: float
    duplicate: bool

    def row(self) -> Row:
        return (self.request_id, self.tenant, self.task_id, self.ts, int(self.duplicate))


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    tenant: str
    task_id: str
    success: bool
    score: float | None
    metric: str | None
    ts: float
    feedback_id: str

    def row(self) -> Row:
        return (
            self.tenant,
            self.task_id,
            int(self.success),
            self.score,
            self.metric,
            self.ts,
            self.feedback_id,
            1,  # one report, added to those stored
        )


class ValueStore:
    """The two writers, and the reads feedback needs (`reads`: the outcome writer's store, so
    that no third connection is held); `add` never blocks or does I/O."""

    def __init__(self, requests: Writer, outcomes: Writer, reads: Database) -> None:
        self.requests = requests
        self.outcomes = outcomes
        self._store = reads
        self._ledger_known = False  # the ledger's `requests` table was seen

    @property
    def writers(self) -> tuple[Writer, Writer]:
        return self.requests, self.outcomes

    @property
    def queued(self) -> int:
        return self.requests.queued + self.outcomes.queued

    def add(self, row: RequestRow | OutcomeRow) -> None:
        if isinstance(row, RequestRow):
            self.requests.put(row.row())
        else:
            self.outcomes.put(row.row())

    async def open(self) -> None:
        """Open both stores (one that is down is retried by its writer)."""
        for writer in self.writers:
            await writer.open()

    async def salt(self, configured: str | None) -> str:
        """The salt in use: `configured` if given, else the stored one, else a new one, stored.
        Insert-if-absent, then read back: replicas starting together all get the first one.
        Raises StoreUnavailable."""
        if configured is not None:
            return configured
        await self._store.insert(VALUE_META, [("salt", secrets.token_hex(32))])
        [(stored,)] = await self._store.select("SELECT value FROM value_meta WHERE key = 'salt'")
        return str(stored)

    async def find_request(self, request_id: str) -> tuple[str, str] | None:
        """(tenant, task id) of a stored request, from these tables or the ledger's."""
        p = self._store.dialect.param
        found = await self._store.select(
            f"SELECT tenant, task_id FROM task_requests WHERE request_id = {p}", (request_id,)
        )
        if not found and await self._has_ledger():
            found = await self._store.select(
                f"SELECT tenant, request_id FROM requests WHERE request_id = {p}", (request_id,)
            )
        return (str(found[0][0]), str(found[0][1])) if found else None

    async def task_tenants(self, task_id: str) -> set[str]:
        """The tenants with a stored task of this id."""
        p = self._store.dialect.param
        rows = await self._store.select(
            f"SELECT DISTINCT tenant FROM task_requests WHERE task_id = {p}", (task_id,)
        )
        tenants = {str(r[0]) for r in rows}
        if await self._has_ledger():
            # A request sent alone is its own task, named by its key.
            alone = await self._store.select(
                f"SELECT tenant FROM requests WHERE request_id = {p} AND NOT EXISTS "
                f"(SELECT 1 FROM task_requests t WHERE t.request_id = {p} AND t.task_id <> {p})",
                (task_id, task_id, task_id),
            )
            tenants.update(str(r[0]) for r in alone)
        return tenants

    async def _has_ledger(self) -> bool:
        if not self._ledger_known:
            found = await self._store.select(self._store.dialect.has_table, ("requests",))
            self._ledger_known = bool(found)
        return self._ledger_known

    async def flush(self) -> bool:
        """Write everything queued; False (rows kept) if the database refused."""
        done = [await writer.flush() for writer in self.writers]
        return all(done)

    async def close(self) -> None:
        """Write what the database takes; spill the rest for the next run."""
        for writer in self.writers:
            await writer.close()


def value_store(
    url: str,
    spill_path: str | None,
    *,
    on_error: Callable[[str], None],
    on_spilled: Callable[[int], None] = lambda n: None,
    max_queue: int = 200_000,
    clock: Callable[[], float] = time.time,
) -> ValueStore:
    """The store beside the ledger at `url` (nothing is connected yet); rows beyond the queue
    spill to `spill_path` (the ledger's spill file: the value tables have their own version
    there), or, without one, the oldest is dropped."""

    def writer(table: Table, store: Database) -> Writer:
        return Writer(
            store,
            table,
            name=f"value {table.name}",
            spill=None if spill_path is None else SqliteStore(spill_path, VALUE_SCHEMA),
            on_error=on_error,
            on_spilled=on_spilled,
            max_queue=max_queue,
            clock=clock,
        )

    reads = open_store(url, VALUE_SCHEMA)
    return ValueStore(
        writer(TASK_REQUESTS, open_store(url, VALUE_SCHEMA)), writer(TASK_OUTCOMES, reads), reads
    )
