"""The storage seam: a `Store` takes batches of rows for the tables of one `Schema`; which store
is a matter of URL (`sqlite:///path`, `postgresql://...`), never a branch in the writer.

A store raises `StoreUnavailable` when the database, not the rows, refused (down, locked, a
full disk, a schema from a newer meterproxy): the rows are kept and written again later, which
is harmless because every table has a unique key and a row already stored is skipped. A row
that cannot be stored at all is returned to the caller with the reason, and the rest are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .schema import Row, Schema, Table

Rejected = tuple[Row, str]  # a row no retry can store, and why (an exception's name)
SQLITE = "sqlite:///"
POSTGRES = ("postgresql://", "postgres://")


class StoreUnavailable(Exception):
    """The database refused; the rows were not written and must be kept."""


class Store(Protocol):
    where: str  # for logs and errors: a file path, or the URL without its password

    async def open(self) -> None:
        """Connect and create or migrate the schema; raises StoreUnavailable."""

    async def insert(self, table: Table, rows: Sequence[Row]) -> list[Rejected]:
        """Store the rows in one atomic step, skipping any whose key is already stored; if some
        row itself is at fault, store the others and return the ones that failed. Raises
        StoreUnavailable (nothing stored, or a step whose outcome is unknown)."""

    async def close(self) -> None: ...


def sqlite_path(url: str) -> str | None:
    """`sqlite:///./x.db` -> `./x.db`, `sqlite:////var/x.db` -> `/var/x.db`; None if not SQLite."""
    return url[len(SQLITE) :] if url.startswith(SQLITE) and len(url) > len(SQLITE) else None


def is_postgres(url: str) -> bool:
    return url.startswith(POSTGRES)


def redact(url: str) -> str:
    """The URL as it may appear in a log line: no password, in the netloc or the query."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = urlencode(
        [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="*"
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def open_store(url: str, schema: Schema, *, timeout_s: float = 10.0) -> Store:
    """The store a URL names (nothing is connected yet)."""
    path = sqlite_path(url)
    if path is not None:
        from .sqlite import SqliteStore

        return SqliteStore(path, schema)
    if is_postgres(url):
        from .postgres import PostgresStore  # the optional `postgres` extra, imported when asked

        return PostgresStore(url, schema, timeout_s=timeout_s)
    raise ValueError(f"unsupported store URL {redact(url)!r}: use sqlite:///PATH or postgresql://")
