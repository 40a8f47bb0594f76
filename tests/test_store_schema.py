"""Tables declared once for every backend: columns, the unique key, the time column, and each
dialect's versioned migrations, which must agree on the version they end at."""

from __future__ import annotations

import re

import pytest

from meterproxy.ledger import LEDGER_SCHEMA, SCHEMA_VERSION
from meterproxy.store.schema import Column, Kind, Schema, SchemaTooNew, Table

NOTES = Table(
    "notes",
    (Column("key", Kind.TEXT), Column("ts", Kind.TIME), Column("n", Kind.INT)),
    key="key",
    time="ts",
)


def test_a_table_names_its_columns_in_order() -> None:
    assert NOTES.names == ("key", "ts", "n")
    assert NOTES.index("n") == 2
    with pytest.raises(ValueError):
        NOTES.index("missing")


def test_a_schema_finds_its_tables_by_name() -> None:
    schema = Schema("notes", (NOTES,), sqlite=((1, ()),), postgres=((1, ()),))
    assert schema.table("notes") is NOTES
    with pytest.raises(KeyError):
        schema.table("requests")


def test_schema_too_new_says_where_which_and_what_to_do() -> None:
    message = str(SchemaTooNew("/var/lib/meterproxy/usage.db", "ledger", 7, 2))
    assert message == (
        "/var/lib/meterproxy/usage.db: the ledger schema is at version 7, this meterproxy "
        "knows versions up to 2; upgrade meterproxy (its rows are kept meanwhile)"
    )


@pytest.mark.parametrize("schema", [LEDGER_SCHEMA], ids=lambda s: s.component)
def test_declared_schemas_are_consistent(schema: Schema) -> None:
    for migrations in (schema.sqlite, schema.postgres):
        versions = [version for version, _ in migrations]
        assert versions == sorted(set(versions)) and versions[0] >= 1
        assert all(statements for _, statements in migrations)
    # One version number for both backends.
    assert schema.sqlite[-1][0] == schema.postgres[-1][0]
    for table in schema.tables:
        assert set(table.key) <= set(table.names) and len(set(table.names)) == len(table.names)
        if table.time is not None:
            assert table.columns[table.index(table.time)].kind is Kind.TIME
        # Every declared column is created by each dialect's migrations.
        for migrations in (schema.sqlite, schema.postgres):
            sql = "\n".join(s for _, statements in migrations for s in statements)
            for name in table.names:
                assert re.search(rf"\b{name}\b", sql), (schema.component, name)


def test_the_ledgers_version_is_its_last_migration() -> None:
    assert SCHEMA_VERSION == LEDGER_SCHEMA.sqlite[-1][0] == 2
