"""Tables described once, for every backend: typed columns, the unique key that makes a retried
write harmless, and each dialect's versioned migrations.

A component (the ledger today; tasks and outcomes next) declares a `Schema`: its tables and, per
dialect, `(version, statements)` steps. A store applies the steps above the version it finds and
records the new one: SQLite in `PRAGMA user_version` (one schema per file), PostgreSQL in the
`schema_version` table (one row per component, so several components share a database).
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
class Table:
    name: str
    columns: tuple[Column, ...]
    key: str  # unique: a row whose key is already stored is the same row again, skipped
    time: str | None = None  # the TIME column that dates a row (the age of a backlog)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def index(self, name: str) -> int:
        return self.names.index(name)


@dataclass(frozen=True)
class Schema:
    component: str
    tables: tuple[Table, ...]
    sqlite: tuple[Migration, ...]
    postgres: tuple[Migration, ...]

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
