"""The SQLite store: migrations from an empty file and from an older version, a file from a newer
meterproxy refused untouched, duplicates skipped (never doubled), rows at fault returned while
the rest are stored, and the spill-file operations (take, delete, count, open_existing)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from meterproxy.ledger import LEDGER_SCHEMA, SCHEMA
from meterproxy.store.base import StoreUnavailable
from meterproxy.store.schema import Column, Kind, Schema, Table
from meterproxy.store.sqlite import SqliteStore, connect

NOTES = Table(
    "notes",
    (Column("key", Kind.TEXT), Column("ts", Kind.TIME), Column("body", Kind.TEXT)),
    key=("key",),
    time="ts",
)
V1 = (1, ("CREATE TABLE notes (id INTEGER PRIMARY KEY, key TEXT NOT NULL, ts REAL NOT NULL)",))
V2 = (
    2,
    (
        "ALTER TABLE notes ADD COLUMN body TEXT",
        "UPDATE notes SET body = 'from v1'",
        "CREATE UNIQUE INDEX notes_key ON notes (key)",
    ),
)
SCHEMA_V1 = Schema("notes", (NOTES,), sqlite=(V1,), postgres=())
SCHEMA_V2 = Schema("notes", (NOTES,), sqlite=(V1, V2), postgres=())


def version(path: Path) -> int:
    """The `notes` component's version, as its row of `schema_version` records it."""
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT version FROM schema_version WHERE component = 'notes'").fetchone()
    db.close()
    return int(row[0]) if row else 0


def stored(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        found = db.execute("SELECT key, ts, body FROM notes ORDER BY id").fetchall()
    db.close()
    return found


async def test_an_empty_file_is_migrated_to_the_newest_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "notes.db"  # the folder is created
    store = SqliteStore(str(path), SCHEMA_V2)
    assert not store.opened
    await store.open()
    assert store.opened and version(path) == 2
    assert await store.insert(NOTES, [("a", 1.0, "x"), ("b", 2.0, None)]) == []
    await store.close()
    assert stored(path) == [("a", 1.0, "x"), ("b", 2.0, None)]


async def test_a_version_1_file_is_migrated_in_place_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    connect(str(path), SCHEMA_V1).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO notes (key, ts) VALUES ('old', 1.5)")
    db.close()
    assert version(path) == 1
    store = SqliteStore(str(path), SCHEMA_V2)
    await store.insert(NOTES, [("new", 2.5, "y")])  # insert opens (and migrates) first
    await store.close()
    assert version(path) == 2
    assert stored(path) == [("old", 1.5, "from v1"), ("new", 2.5, "y")]


async def test_the_ledger_migrated_from_v1_has_the_same_table_as_a_new_one(
    tmp_path: Path,
) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    with sqlite3.connect(old) as db:
        db.executescript(SCHEMA)  # as version 1 created it: user_version 0, the table there
    db.close()
    for path in (old, new):
        store = SqliteStore(str(path), LEDGER_SCHEMA)
        await store.open()
        await store.close()

    def shape(path: Path) -> tuple[list[tuple[object, ...]], list[str]]:
        with sqlite3.connect(path) as db:
            columns = db.execute("PRAGMA table_info(requests)").fetchall()
            indexes = db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests' "
                "ORDER BY name"
            ).fetchall()
        db.close()
        return columns, [i[0] for i in indexes]

    assert shape(old) == shape(new)

    def user_version(path: Path) -> int:  # the ledger's version stays where its files have it
        with sqlite3.connect(path) as db:
            found: int = db.execute("PRAGMA user_version").fetchone()[0]
        db.close()
        return found

    assert user_version(old) == user_version(new) == LEDGER_SCHEMA.sqlite[-1][0]


async def test_a_file_from_a_newer_meterproxy_is_refused_and_left_as_it_is(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.db"
    connect(str(path), SCHEMA_V2).close()
    store = SqliteStore(str(path), SCHEMA_V1)
    with pytest.raises(StoreUnavailable, match=r"schema is at version 2.*up to 1"):
        await store.open()
    assert not store.opened
    await store.close()
    assert version(path) == 2


async def test_a_row_whose_key_is_stored_is_skipped_never_doubled(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    store = SqliteStore(str(path), SCHEMA_V2)
    assert await store.insert(NOTES, [("a", 1.0, "first"), ("a", 1.0, "again")]) == []
    assert await store.insert(NOTES, [("a", 9.0, "retried"), ("b", 2.0, "x")]) == []
    await store.close()
    assert stored(path) == [("a", 1.0, "first"), ("b", 2.0, "x")]


async def test_a_row_at_fault_is_returned_and_the_rest_are_stored(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    store = SqliteStore(str(path), SCHEMA_V2)
    # A NULL where none may be; an integer past 64 bits, which sqlite3 cannot bind.
    rows = [("a", 1.0, "x"), ("b", None, "NULL ts"), ("c", 2**64, "big"), ("d", 4.0, "y")]
    rejected = await store.insert(NOTES, rows)
    await store.close()
    assert [(row[0], why) for row, why in rejected] == [
        ("b", "IntegrityError"),
        ("c", "OverflowError"),
    ]
    assert stored(path) == [("a", 1.0, "x"), ("d", 4.0, "y")]


async def test_take_delete_and_count_hand_rows_on_oldest_first(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "spill.db"), SCHEMA_V2)
    await store.insert(NOTES, [("c", 30.0, None), ("a", 10.0, None), ("b", 20.0, None)])
    assert await store.count(NOTES) == (3, 10.0)
    taken = await store.take(NOTES, 2)
    assert taken == [("c", 30.0, None), ("a", 10.0, None)]  # in the order written
    assert await store.count(NOTES) == (3, 10.0)  # taken rows stay until deleted
    await store.delete(NOTES, [(row[0],) for row in taken])
    assert await store.take(NOTES, 10) == [("b", 20.0, None)]
    assert await store.count(NOTES) == (1, 20.0)
    await store.delete(NOTES, [("b",), ("never-stored",)])
    assert await store.count(NOTES) == (0, None)
    await store.close()


async def test_open_existing_creates_no_file(tmp_path: Path) -> None:
    path = tmp_path / "spill.db"
    store = SqliteStore(str(path), SCHEMA_V2)
    assert await store.open_existing() is False
    assert not path.exists() and not store.opened
    await store.insert(NOTES, [("a", 1.0, None)])
    await store.close()
    again = SqliteStore(str(path), SCHEMA_V2)
    assert await again.open_existing() is True and again.opened
    assert await again.count(NOTES) == (1, 1.0)
    await again.close()


async def test_a_value_sqlite_cannot_bind_is_the_rows_fault_not_the_databases(
    tmp_path: Path,
) -> None:
    """Python 3.11 raises ProgrammingError for an unbindable value: that row is rejected and the
    rest written, never the whole batch kept as if the database were down."""
    path = tmp_path / "notes.db"
    store = SqliteStore(str(path), SCHEMA_V2)
    rows = [("a", 1.0, "x"), ("b", 2.0, object()), ("c", 3.0, "z")]
    rejected = await store.insert(NOTES, rows)
    await store.close()
    assert [(row[0], why) for row, why in rejected] == [("b", "ProgrammingError")]
    assert stored(path) == [("a", 1.0, "x"), ("c", 3.0, "z")]
