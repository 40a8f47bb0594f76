"""SQLite store: one connection and one thread per store (sqlite3 blocks), WAL mode with
synchronous=NORMAL so that each committed batch survives a killed process, a component's schema
version in the `schema_version` table (the ledger's in `PRAGMA user_version`), so components
share a file. Also the spill file's store: `take`, `delete` and `count` let a writer hand its
rows on to another store later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..storage import open_wal, writer_thread
from .base import Rejected, StoreUnavailable
from .dialect import SQLITE
from .schema import Row, Schema, SchemaTooNew, Table

log = logging.getLogger(__name__)
T = TypeVar("T")
# A row at fault, not the database: a NULL where none may be, a value sqlite3 cannot bind.
ROW_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    # An unbindable value (Python 3.11+; 3.10 raised InterfaceError). A closed connection is
    # never reached here: `_conn` refuses with OperationalError first.
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    ValueError,
    TypeError,
    OverflowError,
)
VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    migrated_at REAL NOT NULL
)"""


def insert_sql(table: Table) -> str:
    # A row whose key is already stored is the same row again: skipped, never doubled. (Not
    # INSERT OR IGNORE: that would also skip a row that breaks a NOT NULL rule, silently.)
    return (
        f"INSERT INTO {table.name} ({', '.join(table.names)}) "
        f"VALUES ({', '.join('?' * len(table.columns))}) "
        f"ON CONFLICT ({', '.join(table.key)}) {on_conflict(table)}"
    )


def on_conflict(table: Table) -> str:
    """`DO NOTHING`, or the upsert's `DO UPDATE` (store/postgres.py composes its own)."""
    upsert = table.upsert
    if upsert is None:
        return "DO NOTHING"
    sets = [
        f"{name} = {table.name}.{name} + excluded.{name}"
        if name == upsert.count
        else f"{name} = excluded.{name}"
        for name in table.names
        if name not in table.key
    ]
    return (
        f"DO UPDATE SET {', '.join(sets)} WHERE excluded.{upsert.newer} >= "
        f"{table.name}.{upsert.newer} AND excluded.{upsert.same} <> {table.name}.{upsert.same}"
    )


def connect(path: str, schema: Schema) -> sqlite3.Connection:
    db = open_wal(path, "")
    try:
        migrate(db, schema, path)
    except BaseException:
        db.close()
        raise
    return db


def migrate(db: sqlite3.Connection, schema: Schema, where: str) -> None:
    if not schema.sqlite_user_version:
        migrate_component(db, schema, where)
        return
    version = db.execute("PRAGMA user_version").fetchone()[0]
    newest = schema.sqlite[-1][0]
    if version > newest:
        raise SchemaTooNew(where, schema.component, version, newest)
    for target, statements in schema.sqlite:
        if version >= target:
            continue
        with db:
            db.execute("BEGIN")
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")
        if version:
            log.info("%s: %s schema migrated to version %d", where, schema.component, target)
        version = target


def migrate_component(db: sqlite3.Connection, schema: Schema, where: str) -> None:
    """A component's version is its row of `schema_version`; the steps run under the write
    lock (BEGIN IMMEDIATE), so processes sharing the file migrate once."""
    newest = schema.sqlite[-1][0]
    if _component_version(db, schema, where) == newest:
        return  # the usual case, without taking the write lock
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute(VERSION_TABLE)
        version = _component_version(db, schema, where)
        for target, statements in schema.sqlite:
            if version < target:
                for statement in statements:
                    db.execute(statement)
        db.execute(
            "INSERT INTO schema_version (component, version, migrated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (component) DO UPDATE SET "
            "version = excluded.version, migrated_at = excluded.migrated_at",
            (schema.component, newest, time.time()),
        )
    if version < newest:
        log.info("%s: %s schema at version %d (was %d)", where, schema.component, newest, version)


def _component_version(db: sqlite3.Connection, schema: Schema, where: str) -> int:
    if db.execute(SQLITE.has_table, ("schema_version",)).fetchone() is None:
        return 0
    found = db.execute(
        "SELECT version FROM schema_version WHERE component = ?", (schema.component,)
    ).fetchone()
    version = 0 if found is None else int(found[0])
    if version > schema.sqlite[-1][0]:
        raise SchemaTooNew(where, schema.component, version, schema.sqlite[-1][0])
    return version


class SqliteStore:
    dialect = SQLITE

    def __init__(self, path: str, schema: Schema) -> None:
        self.path = self.where = path
        self._schema = schema
        self._thread = writer_thread("sqlite")
        self._db: sqlite3.Connection | None = None

    @property
    def opened(self) -> bool:
        return self._db is not None

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn)
        except (sqlite3.Error, OSError, SchemaTooNew) as exc:  # the file, not the rows
            raise StoreUnavailable(f"{self.where}: {exc}") from exc

    async def open(self) -> None:
        # Decided on the store's one thread: two callers opening at once share one connection.
        if self._db is None:
            self._db = await self._call(lambda: self._db or connect(self.path, self._schema))

    async def open_existing(self) -> bool:
        """Open the file if there is one (a spill file is created only when a row needs it)."""
        if self._db is None:
            self._db = await self._call(
                lambda: (
                    self._db
                    or (connect(self.path, self._schema) if os.path.exists(self.path) else None)
                )
            )
        return self._db is not None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("not open")
        return self._db

    async def insert(self, table: Table, rows: Sequence[Row]) -> list[Rejected]:
        await self.open()
        return await self._call(lambda: self._insert(table, rows))

    def _insert(self, table: Table, rows: Sequence[Row]) -> list[Rejected]:
        """One transaction per batch; if a row itself is at fault, the batch is written row by
        row and the rows that still fail are returned."""
        db, sql = self._conn(), insert_sql(table)
        try:
            with db:
                db.execute("BEGIN")
                db.executemany(sql, rows)
            return []
        except ROW_ERRORS as exc:
            log.warning(
                "%s: a batch of %d rows failed (%s); row by row", self.where, len(rows), exc
            )
        rejected: list[Rejected] = []
        with db:
            db.execute("BEGIN")
            for one in rows:
                try:
                    db.execute(sql, one)
                except ROW_ERRORS as exc:
                    rejected.append((one, type(exc).__name__))
        return rejected

    async def select(self, statement: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        await self.open()
        return await self._call(lambda: self._conn().execute(statement, args).fetchall())

    async def take(self, table: Table, limit: int) -> list[Row]:
        """The oldest `limit` rows (they stay until `delete`)."""
        await self.open()
        sql = f"SELECT {', '.join(table.names)} FROM {table.name} ORDER BY rowid LIMIT ?"
        return await self._call(lambda: self._conn().execute(sql, (limit,)).fetchall())

    async def delete(self, table: Table, keys: Sequence[tuple[object, ...]]) -> None:
        # By key, not by rowid range: another process sharing the file may have reused a rowid.
        match = " AND ".join(f"{name} = ?" for name in table.key)
        sql = f"DELETE FROM {table.name} WHERE {match}"

        def run() -> None:
            with self._conn() as db:
                db.execute("BEGIN")
                db.executemany(sql, keys)

        await self._call(run)

    async def count(self, table: Table) -> tuple[int, float | None]:
        """Rows held, and the oldest one's time (Unix seconds) when the table has a time."""
        oldest = f"min({table.time})" if table.time else "NULL"
        sql = f"SELECT count(*), {oldest} FROM {table.name}"
        found = await self._call(lambda: self._conn().execute(sql).fetchone())
        return int(found[0]), found[1]

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=True)
