"""PostgreSQL store, the home of the driver: psycopg 3.

Why psycopg 3 over asyncpg: it is libpq, so a `ledger.url` means what it means to psql and every
other PostgreSQL tool (the same URL keys, `sslmode`, `PGPASSWORD`, `~/.pgpass`, service files);
it is typed (mypy strict needs no stubs), async without a thread per query, maintained by the
psycopg2 authors, and ships as one binary wheel (`pip install 'meterproxy[postgres]'`).

A batch is ONE statement, `INSERT ... SELECT FROM unnest(<one array per column>) ON CONFLICT
(key) DO NOTHING`, in autocommit: it is atomic, costs one round trip whatever its size, and a
batch sent again after a timeout (the server may have committed it before the reply was lost)
stores nothing twice. Columns are typed properly: BIGINT tokens, DOUBLE PRECISION seconds,
joules and dollars, BOOLEAN flags, TIMESTAMPTZ times (rows carry Unix seconds; `to_timestamp`
converts them in the statement). The schema is created and migrated on connect, under an
advisory lock so that replicas starting together migrate once; each component's version is a
row of `schema_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from .base import Rejected, StoreUnavailable, redact
from .schema import Kind, Row, Schema, SchemaTooNew, Table

log = logging.getLogger(__name__)

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    migrated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""
MIGRATION_LOCK = 0x6D65746572  # pg_advisory_xact_lock key: "meter"
ARRAY = {
    Kind.TEXT: "text[]",
    Kind.INT: "int8[]",
    Kind.REAL: "float8[]",
    Kind.BOOL: "bool[]",
    Kind.TIME: "float8[]",
}
CONVERT: dict[Kind, Callable[[Any], Any]] = {
    Kind.TEXT: lambda v: v,
    Kind.INT: lambda v: v,
    Kind.REAL: float,
    Kind.BOOL: bool,
    Kind.TIME: float,
}
# The rows at fault, not the server: a NULL where none may be, a value out of a column's range.
ROW_ERRORS = (psycopg.IntegrityError, psycopg.DataError, ValueError, TypeError, OverflowError)
# libpq options: give up on a dead peer within seconds rather than at the kernel's TCP timeout.
CONNECT: dict[str, Any] = {
    "application_name": "meterproxy",
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,
}


def insert_sql(table: Table) -> sql.Composed:
    names = sql.SQL(", ").join(sql.Identifier(n) for n in table.names)
    values = sql.SQL(", ").join(
        sql.SQL("to_timestamp({})").format(sql.Identifier(c.name))
        if c.kind is Kind.TIME
        else sql.Identifier(c.name)
        for c in table.columns
    )
    arrays = sql.SQL(", ").join(
        sql.SQL("{}::" + ARRAY[c.kind]).format(sql.Placeholder()) for c in table.columns
    )
    return sql.SQL(
        "INSERT INTO {table} ({names}) SELECT {values} FROM unnest({arrays}) AS r ({names}) "
        "ON CONFLICT ({key}) DO NOTHING"
    ).format(
        table=sql.Identifier(table.name),
        names=names,
        values=values,
        arrays=arrays,
        key=sql.Identifier(table.key),
    )


def columns(table: Table, rows: Sequence[Row]) -> list[list[Any]]:
    """Rows to one list per column, each value as its column's array type wants it."""
    out: list[list[Any]] = []
    for i, column in enumerate(table.columns):
        convert = CONVERT[column.kind]
        out.append([None if r[i] is None else convert(r[i]) for r in rows])
    return out


class PostgresStore:
    def __init__(self, url: str, schema: Schema, *, timeout_s: float = 10.0) -> None:
        self._url = url
        self.where = redact(url)
        self._schema = schema
        self._timeout_s = timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def open(self) -> None:
        await self._connection()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(self._url, autocommit=True, **CONNECT),
                self._timeout_s,
            )
            await asyncio.wait_for(migrate(conn, self._schema, self.where), self._timeout_s)
        except (psycopg.Error, OSError, asyncio.TimeoutError, SchemaTooNew) as exc:
            if conn is not None:
                await conn.close()
            raise StoreUnavailable(f"{self.where}: {_reason(exc)}") from exc
        self._conn = conn
        return conn

    async def insert(self, table: Table, rows: Sequence[Row]) -> list[Rejected]:
        conn = await self._connection()
        statement = insert_sql(table)
        try:
            try:
                await self._execute(conn, statement, columns(table, rows))
                return []
            except ROW_ERRORS as exc:
                log.warning(
                    "%s: a batch of %d rows failed (%s); row by row", self.where, len(rows), exc
                )
            rejected: list[Rejected] = []
            for one in rows:
                try:
                    await self._execute(conn, statement, columns(table, [one]))
                except ROW_ERRORS as exc:
                    rejected.append((one, type(exc).__name__))
            return rejected
        except (psycopg.Error, OSError, asyncio.TimeoutError) as exc:
            await self._drop()
            raise StoreUnavailable(f"{self.where}: {_reason(exc)}") from exc

    async def _execute(
        self, conn: psycopg.AsyncConnection[Any], statement: sql.Composed, params: list[Any]
    ) -> None:
        task = asyncio.ensure_future(conn.execute(statement, params))
        try:
            done, _ = await asyncio.wait({task}, timeout=self._timeout_s)
        except asyncio.CancelledError:
            await self._cut(conn, task)
            raise
        if not done:
            await self._cut(conn, task)
            raise asyncio.TimeoutError
        task.result()

    async def _cut(self, conn: psycopg.AsyncConnection[Any], task: asyncio.Future[Any]) -> None:
        """No answer (a timeout, or the writer stopping): the statement may or may not have
        committed. Close the connection rather than cancel the statement (psycopg would ask the
        server to cancel it and wait up to 10 s for a server that is not answering); the batch
        is sent again on a new connection, and its key makes that harmless."""
        if self._conn is conn:
            self._conn = None
        await conn.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, psycopg.Error, OSError):
            await task

    async def _drop(self) -> None:
        """Forget a connection in an unknown state; the next write reconnects (and re-checks
        the schema: the server may have come back empty)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        await self._drop()


async def migrate(conn: psycopg.AsyncConnection[Any], schema: Schema, where: str) -> None:
    steps = schema.postgres
    newest = steps[-1][0]
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(VERSION_TABLE)
        cur = await conn.execute(
            "SELECT version FROM schema_version WHERE component = %s", (schema.component,)
        )
        found = await cur.fetchone()
        version = 0 if found is None else int(found[0])
        if version > newest:
            raise SchemaTooNew(where, schema.component, version, newest)
        if version == newest:
            return
        for target, statements in steps:
            if version < target:
                for statement in statements:
                    await conn.execute(sql.SQL(statement))
        await conn.execute(
            "INSERT INTO schema_version (component, version) VALUES (%s, %s) "
            "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, migrated_at = now()",
            (schema.component, newest),
        )
    log.info("%s: %s schema at version %d (was %d)", where, schema.component, newest, version)


def query(url: str, statement: str, args: Sequence[object]) -> list[tuple[Any, ...]]:
    """One read for `meterproxy usage` (synchronous: the CLI has no event loop)."""
    try:
        with psycopg.connect(url, **CONNECT) as conn:
            return conn.execute(sql.SQL(statement), args).fetchall()
    except psycopg.Error as exc:
        raise StoreUnavailable(f"{redact(url)}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
