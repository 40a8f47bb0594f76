"""What the usage ledger says a tenant spent in a period: the truth from which a quota store that
lost its state (a Redis restarted without persistence, or flushed) rebuilds day and month
budgets, and against which the drift check compares it.

Spend is counted the way quota settlement counts it: tokens = prompt + completion, USD =
cost_usd, joules = energy_j, each row in the period that holds its `ts` (the request's end).
A ledger has an `identity`: replicas writing one ledger (the workers of a host on one SQLite
file, or every replica on one PostgreSQL) share it, and their spend is rebuilt once. A read
returns a watermark, and `counted` tells later whether a row was among what that read saw:
SQLite's largest row id (one writer commits at a time), PostgreSQL's snapshot (its writers
commit in any order, so ids would not do).
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from .store.base import is_postgres, redact, sqlite_path


class LedgerReadError(Exception):
    """The ledger could not be read (locked too long, missing, corrupt)."""


@dataclass(frozen=True)
class Spend:
    tokens: float = 0.0
    usd: float = 0.0
    joules: float = 0.0

    def __sub__(self, other: Spend) -> Spend:
        return Spend(self.tokens - other.tokens, self.usd - other.usd, self.joules - other.joules)


@dataclass(frozen=True)
class Span:
    """A half-open interval of Unix seconds: [start_s, end_s)."""

    start_s: float
    end_s: float


class LedgerSpend(Protocol):
    @property
    def identity(self) -> str:
        """The same for every process that writes this ledger."""
        ...

    def spend(
        self, tenant: str, day: Span, month: Span, exclude: Collection[str]
    ) -> tuple[Spend, str]:
        """Blocking (run it in a thread): tokens and joules in `day`, USD in `month`, leaving
        out the rows of the request keys in `exclude`; and a watermark: what this read saw.
        Raises LedgerReadError."""
        ...

    def counted(self, keys: Collection[str], watermark: str) -> set[str]:
        """Blocking: which of `keys` have rows that a read with this watermark saw."""
        ...


_SUMS = (
    "SELECT coalesce(sum(CASE WHEN ts >= ? AND ts < ? "
    "THEN coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0) END), 0), "
    "coalesce(sum(CASE WHEN ts >= ? AND ts < ? THEN cost_usd END), 0), "
    "coalesce(sum(CASE WHEN ts >= ? AND ts < ? THEN energy_j END), 0) "
    "FROM requests WHERE tenant = ? AND ts >= ? AND ts < ? AND id <= ?"
)
_CHUNK = 500  # request keys per IN (...) query: under SQLite's variable limit


class SqliteSpend:
    """Reads the SQLite usage ledger (read-only, its own connection; WAL readers never block
    the writers). The watermark is the largest row id: SQLite commits one writer at a time and
    never reuses a higher id, so the rows a read saw are exactly those up to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._identity = f"sqlite:{socket.gethostname()}:{os.path.realpath(path)}"

    @property
    def identity(self) -> str:
        return self._identity

    def _connect(self) -> sqlite3.Connection | None:
        if not os.path.exists(self.path):
            return None
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
        db.isolation_level = None
        return db

    def spend(
        self, tenant: str, day: Span, month: Span, exclude: Collection[str]
    ) -> tuple[Spend, str]:
        try:
            return self._spend(tenant, day, month, exclude)
        except sqlite3.Error as exc:
            raise LedgerReadError(f"reading {self.path}: {exc}") from exc

    def counted(self, keys: Collection[str], watermark: str) -> set[str]:
        try:
            return self._counted(keys, watermark)
        except sqlite3.Error as exc:
            raise LedgerReadError(f"reading {self.path}: {exc}") from exc

    def _spend(
        self, tenant: str, day: Span, month: Span, exclude: Collection[str]
    ) -> tuple[Spend, str]:
        db = self._connect()
        if db is None:
            return Spend(), "0"
        try:
            db.execute("BEGIN")  # one snapshot for the watermark and the sums
            try:
                watermark = db.execute("SELECT coalesce(max(id), 0) FROM requests").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # the ledger has not been written yet
                    return Spend(), "0"
                raise
            lo, hi = min(day.start_s, month.start_s), max(day.end_s, month.end_s)
            spans = (day.start_s, day.end_s, month.start_s, month.end_s, day.start_s, day.end_s)
            where = (*spans, tenant, lo, hi, watermark)
            total = Spend(*db.execute(_SUMS, where).fetchone())
            keys = list(exclude)
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                row = db.execute(_SUMS + f" AND request_id IN ({marks})", (*where, *chunk))
                total = total - Spend(*row.fetchone())
            return total, str(watermark)
        finally:
            db.close()

    def _counted(self, keys: Collection[str], watermark: str) -> set[str]:
        db = self._connect()
        if db is None:
            return set()
        try:
            found: set[str] = set()
            keys = list(keys)
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                query = f"SELECT request_id FROM requests WHERE id <= ? AND request_id IN ({marks})"
                found.update(key for (key,) in db.execute(query, (int(watermark), *chunk)))
            return found
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return set()
            raise
        finally:
            db.close()


def ledger_reader(store_url: str) -> LedgerSpend:
    """The reader for a ledger's store URL (`sqlite:///path` or `postgresql://...`)."""
    path = sqlite_path(store_url)
    if path is not None:
        return SqliteSpend(path)
    if is_postgres(store_url):
        return PostgresSpend(store_url)
    raise ValueError(f"no ledger reader for {redact(store_url)!r}")


_PG_SUMS = (
    "SELECT coalesce(sum(CASE WHEN ts >= to_timestamp(%(d0)s) AND ts < to_timestamp(%(d1)s) "
    "THEN coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0) END), 0)::float8, "
    "coalesce(sum(CASE WHEN ts >= to_timestamp(%(m0)s) AND ts < to_timestamp(%(m1)s) "
    "THEN cost_usd END), 0)::float8, "
    "coalesce(sum(CASE WHEN ts >= to_timestamp(%(d0)s) AND ts < to_timestamp(%(d1)s) "
    "THEN energy_j END), 0)::float8 "
    "FROM requests WHERE tenant = %(tenant)s "
    "AND ts >= to_timestamp(%(lo)s) AND ts < to_timestamp(%(hi)s)"
)
# Was a row's inserting transaction committed in the snapshot? A row holds only the low 32 bits
# of its transaction id: the full id is the one below the current snapshot's xmax with those
# bits (every committed row's transaction is below it). Ids 0-2 are frozen: always visible.
_PG_COUNTED = """
WITH now AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS x)
SELECT r.request_id FROM requests r, now
WHERE r.request_id = ANY(%(keys)s) AND (
  r.xmin::text::bigint < 3 OR pg_visible_in_snapshot(
    (CASE WHEN now.x - now.x %% 4294967296 + r.xmin::text::bigint >= now.x
          THEN now.x - now.x %% 4294967296 + r.xmin::text::bigint - 4294967296
          ELSE now.x - now.x %% 4294967296 + r.xmin::text::bigint END)::text::xid8,
    %(snapshot)s::pg_snapshot))
"""


class PostgresSpend:
    """Reads the PostgreSQL ledger (psycopg, blocking: run it in a thread)."""

    def __init__(self, url: str) -> None:
        import psycopg  # the optional `postgres` extra, as the store itself

        self.url = url
        self._psycopg = psycopg
        info = psycopg.conninfo.conninfo_to_dict(url)
        where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        self._identity = f"postgresql:{where}"

    @property
    def identity(self) -> str:
        return self._identity

    def spend(
        self, tenant: str, day: Span, month: Span, exclude: Collection[str]
    ) -> tuple[Spend, str]:
        psycopg = self._psycopg
        args = {
            "d0": day.start_s,
            "d1": day.end_s,
            "m0": month.start_s,
            "m1": month.end_s,
            "lo": min(day.start_s, month.start_s),
            "hi": max(day.end_s, month.end_s),
            "tenant": tenant,
        }
        try:
            with psycopg.connect(self.url, connect_timeout=5) as conn:
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # one snapshot
                row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
                assert row is not None
                snapshot = str(row[0])
                total = Spend(*_one(conn.execute(_PG_SUMS, args).fetchone()))
                if exclude:
                    query = _PG_SUMS + " AND request_id = ANY(%(keys)s)"
                    left_out = _one(conn.execute(query, {**args, "keys": list(exclude)}).fetchone())
                    total = total - Spend(*left_out)
                return total, snapshot
        except psycopg.Error as exc:
            raise LedgerReadError(f"reading {redact(self.url)}: {exc}") from exc

    def counted(self, keys: Collection[str], watermark: str) -> set[str]:
        psycopg = self._psycopg
        try:
            with psycopg.connect(self.url, connect_timeout=5, autocommit=True) as conn:
                rows = conn.execute(_PG_COUNTED, {"keys": list(keys), "snapshot": watermark})
                return {str(key) for (key,) in rows}
        except psycopg.Error as exc:
            raise LedgerReadError(f"reading {redact(self.url)}: {exc}") from exc


def _one(row: tuple[object, ...] | None) -> tuple[float, float, float]:
    assert row is not None
    return float(row[0] or 0), float(row[1] or 0), float(row[2] or 0)  # type: ignore[arg-type]
