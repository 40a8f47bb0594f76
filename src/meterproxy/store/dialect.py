"""What differs between the backends' SQL, so that a query is written once: the placeholder of a
parameter, a time bound, an integer sum, the UTC day of a row, whether a table exists."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    name: str
    param: str  # a parameter's placeholder
    time: str  # a parameter in Unix seconds, as the type of a TIME column
    total: str  # the sum of the integer expression `{}`, as an integer (never NULL)
    day: str  # the UTC date of the `ts` column, as YYYY-MM-DD
    has_table: str  # one parameter, a table's name: one row if the table exists


SQLITE = Dialect(
    "sqlite",
    param="?",
    time="?",
    total="coalesce(sum({}), 0)",
    day="date(ts, 'unixepoch')",
    has_table="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
)
# TIME columns are TIMESTAMPTZ; sum(bigint) is NUMERIC (Python's Decimal) unless cast back.
POSTGRES = Dialect(
    "postgres",
    param="%s",
    time="to_timestamp(%s)",
    total="coalesce(sum({}), 0)::bigint",
    day="to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    has_table="SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = %s",
)
