"""The usage ledger: one SQLite row per settled request, written off the request path.

`add` (a settlement sink) makes every value storable (bounded valid text, integers in range)
and appends the row to a bounded queue. One writer task hands batches to one dedicated thread
every `interval_s`; WAL mode with synchronous=NORMAL makes each committed batch survive a
killed process. A database that refuses a batch (locked, full disk) keeps its rows queued for
the next attempt; a row that cannot be stored at all is logged, counted, and the rest of its
batch is written. The writer is supervised: it cannot die silently.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .storage import open_wal

if TYPE_CHECKING:
    from .settlement import Settlement

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,      -- the proxy's own request key (unique)
    ts REAL NOT NULL,              -- end of the request, Unix seconds (UTC)
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt_tokens INTEGER,
    cached_tokens INTEGER,
    completion_tokens INTEGER,
    reasoning_tokens INTEGER,
    token_source TEXT NOT NULL,    -- upstream | estimate | partial | none
    ttft_s REAL,
    duration_s REAL NOT NULL,
    gpu_seconds REAL NOT NULL,
    energy_j REAL,
    cost_usd REAL NOT NULL,
    priced INTEGER NOT NULL,
    waste_reason TEXT,
    client_request_id TEXT,
    client_user TEXT
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
"""
# Versioned migrations (PRAGMA user_version): version -> statements. Version 1 is SCHEMA.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        2,
        (
            "ALTER TABLE requests ADD COLUMN upstream_request_id TEXT",
            "ALTER TABLE requests ADD COLUMN outcome TEXT",
            # Version 1 keyed rows by the client's id when it sent one, which may repeat; those
            # repeats get their row id appended (the client's id stays in client_request_id).
            # From version 2 on the proxy's key is unique: a retried batch never doubles a row.
            "UPDATE requests SET request_id = request_id || '#' || id WHERE id NOT IN "
            "(SELECT min(id) FROM requests GROUP BY request_id)",
            "CREATE UNIQUE INDEX IF NOT EXISTS requests_key ON requests (request_id)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
COLUMNS = (
    "request_id",
    "ts",
    "tenant",
    "model",
    "upstream",
    "endpoint",
    "status",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "token_source",
    "ttft_s",
    "duration_s",
    "gpu_seconds",
    "energy_j",
    "cost_usd",
    "priced",
    "waste_reason",
    "client_request_id",
    "client_user",
    "upstream_request_id",
    "outcome",
)
# A row whose key is already stored is the same request again: skipped, never doubled. (Not
# INSERT OR IGNORE: that would also skip a row that breaks a NOT NULL rule, silently.)
INSERT = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(COLUMNS))}) ON CONFLICT (request_id) DO NOTHING"
)
Row = tuple[object, ...]
# Bounds on what is stored: text columns at most this many characters, integers SQLite's.
MAX_TEXT = 256
INT_MAX = 2**63 - 1


def connect(path: str) -> sqlite3.Connection:
    db = open_wal(path, SCHEMA)
    migrate(db)
    return db


def migrate(db: sqlite3.Connection) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0] or 1
    for target, statements in MIGRATIONS:
        if version >= target:
            continue
        with db:
            db.execute("BEGIN")
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")
        log.info("usage ledger: schema migrated to version %d", target)
        version = target


def storable_text(value: str | None) -> str | None:
    """Bounded, valid UTF-8 (no lone surrogates), no NUL: SQLite stores it as given."""
    if value is None:
        return None
    value = value[:MAX_TEXT]
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def storable_int(value: int | None) -> int | None:
    if value is None:
        return None
    return min(max(value, -INT_MAX), INT_MAX)


def storable_real(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def row(s: Settlement) -> Row:
    u = s.usage
    ttft = s.ttft_ns
    text, num, real = storable_text, storable_int, storable_real
    return (
        text(s.request_id),
        real(s.ts),
        text(s.tenant),
        text(s.model),
        text(s.upstream),
        text(s.endpoint),
        text(s.status),
        num(u.prompt),
        num(u.cached_prompt),
        num(u.completion),
        num(u.reasoning),
        u.source.value,
        None if ttft is None else ttft / 1e9,
        s.duration_ns / 1e9,
        real(s.gpu_seconds) or 0.0,
        real(s.energy_j),
        real(s.cost_usd) or 0.0,
        int(s.priced),
        s.waste_reason,
        text(s.client_request_id),
        text(s.client_user),
        text(s.upstream_request_id),
        s.outcome.value,
    )


class Ledger:
    def __init__(
        self,
        path: str,
        *,
        on_error: Callable[[str], None],
        max_queue: int = 200_000,
        interval_s: float = 0.1,
    ) -> None:
        self.path = path
        self._on_error = on_error  # called with "write", "dropped" or "invalid_row"
        self._queue: collections.deque[Row] = collections.deque()
        self._max_queue = max_queue
        self.interval_s = interval_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._db: sqlite3.Connection | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def add(self, settlement: Settlement) -> None:
        """Settlement sink: queue the row; never blocks, never does I/O."""
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._on_error("dropped")
        self._queue.append(row(settlement))

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._thread, connect, self.path)
        log.info("usage ledger: %s", self.path)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> bool:
        """Write everything queued; False (rows kept) if the database refused."""
        if not self._queue or self._db is None:
            return True
        batch = list(self._queue)
        self._queue.clear()
        loop = asyncio.get_running_loop()
        try:
            rejected = await loop.run_in_executor(self._thread, self._write, batch)
        except sqlite3.Error as exc:  # locked, busy, full, I/O: the database, not the rows
            self._queue.extendleft(reversed(batch))
            while len(self._queue) > self._max_queue:
                self._queue.pop()
                self._on_error("dropped")
            self._on_error("write")
            log.error(
                "usage ledger %s: write of %d rows failed (%s); they stay queued",
                self.path,
                len(batch),
                exc,
            )
            return False
        for bad, reason in rejected:
            self._on_error("invalid_row")
            log.error(
                "usage ledger %s: row for request %r could not be stored (%s); dropped",
                self.path,
                str(bad[0])[:80],
                reason,
            )
        return True

    def _write(self, batch: list[Row]) -> list[tuple[Row, str]]:
        """One transaction per batch; if a row itself is at fault, the batch is written row by
        row and the rows that still fail are returned."""
        assert self._db is not None
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(INSERT, batch)
            return []
        except sqlite3.OperationalError:
            raise
        except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
            log.warning("usage ledger: a batch of %d rows failed (%s); row by row", len(batch), exc)
        rejected: list[tuple[Row, str]] = []
        with self._db:
            self._db.execute("BEGIN")
            for one in batch:
                try:
                    self._db.execute(INSERT, one)
                except sqlite3.OperationalError:
                    raise
                except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
                    rejected.append((one, type(exc).__name__))
        return rejected

    async def close(self) -> None:
        await self.flush()
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=True)
