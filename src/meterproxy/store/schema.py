"""Tables described once, for every backend: typed columns, the unique key that makes a retried
write harmless, what a row whose key is stored already does, and each dialect's versioned
migrations.

A component (the ledger; tasks and outcomes) declares a `Schema`: its tables and, per dialect,
`(version, statements)` steps. A store applies the steps above the version it finds and records
the new one in the `schema_version` table, one row per component, so several components share a
database (a PostgreSQL one, or the SQLite ledger file). The ledger alone keeps its SQLite
version in `PRAGMA user_version`, where its files have had it since version 1.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Row = tuple[object, ...]
Migration = tuple[int, tuple[str, ...]]


class Kind(enum.Enum):
    """What a row holds in a column, and so how each backend stores it."""

    TEXT = "text"
    INT = "int"  # 64-bit (SQLite INTEGER, PostgreSQL BIGINT)
    REAL = "real"  # SQLite REAL, PostgreSQL DOUBLE PRECISION
    BOOL = "bool"  # 0/1 in the row and in SQLite; BOOLEAN in PostgreSQL
    TIME = "time"  # Unix seconds in the row and in SQLite; TIMESTAMPTZ in PostgreSQL


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind


@dataclass(frozen=True)
class Upsert:
    """A row whose key is stored already replaces the stored one when it is newer: the last
    report wins. A row older than the stored one (`newer`: the column that orders them) is
    skipped, so a replayed older batch never overwrites a newer row; the stored row itself sent
    again (`same`: a NOT NULL column that names one row; a batch retried after a timeout, a
    spill drained twice) is skipped too, so `count` stays exact: an INT column that adds up
    (the stored value + the row's) how many rows the stored one stands for."""

    newer: str
    same: str
    count: str | None = None


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # unique: a row whose key is stored already is skipped (or upserted)
    time: str | None = None  # the TIME column that dates a row (the age of a backlog)
    upsert: Upsert | None = None  # None: a stored key is the same row again, skipped

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def key_of(self, row: Row) -> tuple[object, ...]:
        return tuple(row[self.index(name)] for name in self.key)


@dataclass(frozen=True)
class Schema:
    component: str
    tables: tuple[Table, ...]
    sqlite: tuple[Migration, ...]
    postgres: tuple[Migration, ...]
    # SQLite: the version in `PRAGMA user_version` (one such schema per file: the ledger's),
    # not in the `schema_version` table.
    sqlite_user_version: bool = False

    def table(self, name: str) -> Table:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)


class SchemaTooNew(Exception):
    """The database was migrated by a newer meterproxy: this one must not write to it."""

    def __init__(self, where: str, component: str, found: int, known: int) -> None:
        super().__init__(
            f"{where}: the {component} schema is at version {found}, this meterproxy knows "
            f"versions up to {known}; upgrade meterproxy (its rows are kept meanwhile)"
        )
