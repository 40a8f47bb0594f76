"""The usage ledger: one SQLite row per settled request, written off the request path.

`add` (a meter sink) only appends to a bounded queue. One writer task hands batches to one
dedicated thread every `interval_s`; WAL mode with synchronous=NORMAL makes each committed batch
survive a killed process. A failing write (locked database, full disk) is logged and counted,
and its rows stay queued for the next attempt.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .meter import Record
from .storage import open_wal

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
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
INSERT = (
    "INSERT INTO requests (request_id, ts, tenant, model, upstream, endpoint, status, "
    "prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, token_source, ttft_s, "
    "duration_s, gpu_seconds, energy_j, cost_usd, priced, waste_reason, client_request_id, "
    "client_user) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
Row = tuple[object, ...]


def connect(path: str) -> sqlite3.Connection:
    return open_wal(path, SCHEMA)


class Ledger:
    def __init__(
        self,
        path: str,
        *,
        wall_clock: Callable[[], float],
        on_error: Callable[[str], None],
        max_queue: int = 200_000,
        interval_s: float = 0.1,
    ) -> None:
        self.path = path
        self._wall_clock = wall_clock
        self._on_error = on_error  # called with "write" or "dropped"
        self._queue: collections.deque[Row] = collections.deque()
        self._max_queue = max_queue
        self.interval_s = interval_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._db: sqlite3.Connection | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def add(self, record: Record) -> None:
        """Meter sink: queue the row; never blocks, never does I/O."""
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._on_error("dropped")
        u = record.usage
        ttft = record.ttft_ns
        self._queue.append(
            (
                record.request_id,
                self._wall_clock(),
                record.tenant,
                record.model,
                record.upstream,
                record.endpoint,
                record.status,
                u.prompt,
                u.cached_prompt,
                u.completion,
                u.reasoning,
                u.source.value,
                None if ttft is None else ttft / 1e9,
                record.duration_ns / 1e9,
                record.gpu_seconds,
                record.energy_j,
                record.cost_usd,
                int(record.priced),
                record.waste_reason,
                record.client_request_id,
                record.client_user,
            )
        )

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
            await loop.run_in_executor(self._thread, self._write, batch)
        except sqlite3.Error as exc:
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
        return True

    def _write(self, batch: list[Row]) -> None:
        assert self._db is not None
        with self._db:  # one transaction per batch
            self._db.execute("BEGIN")
            self._db.executemany(INSERT, batch)

    async def close(self) -> None:
        await self.flush()
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=True)
