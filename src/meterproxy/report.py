"""`meterproxy usage`: the ledger summed by tenant, model, upstream and/or day, as a table,
CSV or JSON. Reads a SQLite file directly (read-only; safe while the proxy is writing), several
SQLite files merged (a fleet without PostgreSQL; a request in two files counts once, by its
key), or the PostgreSQL ledger.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

DIMENSIONS = ("tenant", "model", "upstream", "day")
COLUMNS = (
    "requests",
    "tokens_in",
    "tokens_out",
    "energy_wh",
    "cost_usd",
    "tokens_per_joule",
    "tokens_per_dollar",
    "waste_share",
)
_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ReportError(Exception):
    pass


def parse_time(text: str, now: float) -> float:
    """`7d`, `12h`, `30m` (ago), or an ISO date/time (UTC unless it says otherwise)."""
    match = _SPAN.match(text.strip())
    if match:
        return now - float(match.group(1)) * _SECONDS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReportError(
            f"cannot read the time {text!r}: use a span like 7d, 12h, 30m or an ISO date "
            "like 2026-11-01"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


@dataclass(frozen=True)
class Row:
    keys: tuple[str, ...]
    requests: int
    tokens_in: int
    tokens_out: int
    energy_j: float
    cost_usd: float
    wasted_out: int

    @property
    def values(self) -> dict[str, float | int | None]:
        tokens = self.tokens_in + self.tokens_out
        return {
            "requests": self.requests,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "energy_wh": self.energy_j / 3600,
            "cost_usd": self.cost_usd,
            "tokens_per_joule": tokens / self.energy_j if self.energy_j else None,
            "tokens_per_dollar": tokens / self.cost_usd if self.cost_usd else None,
            "waste_share": self.wasted_out / self.tokens_out if self.tokens_out else None,
        }


@dataclass(frozen=True)
class Dialect:
    day: str  # the UTC date of `ts`, as YYYY-MM-DD
    param: str
    time: str  # a time bound, from Unix seconds
    total: str  # the sum of an integer column, as an integer


SQLITE = Dialect("date(ts, 'unixepoch')", "?", "?", "coalesce(sum({}), 0)")
POSTGRES = Dialect(
    "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "%s",
    "to_timestamp(%s)",
    "coalesce(sum({}), 0)::bigint",
)
# What a merge of several files keeps of each row: the columns the report reads.
MERGED = (
    "request_id",
    "ts",
    "tenant",
    "model",
    "upstream",
    "prompt_tokens",
    "completion_tokens",
    "energy_j",
    "cost_usd",
    "waste_reason",
)


def _where(d: Dialect, since: float | None, until: float | None) -> tuple[str, list[float]]:
    where, args = [], []
    if since is not None:
        where.append(f"ts >= {d.time}")
        args.append(since)
    if until is not None:
        where.append(f"ts < {d.time}")
        args.append(until)
    return (" WHERE " + " AND ".join(where) if where else ""), args


def _sql(
    d: Dialect, by: list[str], since: float | None, until: float | None
) -> tuple[str, list[float]]:
    keys = [d.day if dim == "day" else dim for dim in by]
    sums = (
        "count(*)",
        d.total.format("prompt_tokens"),
        d.total.format("completion_tokens"),
        "coalesce(sum(energy_j), 0)",
        "coalesce(sum(cost_usd), 0)",
        d.total.format("CASE WHEN waste_reason IS NOT NULL THEN completion_tokens END"),
    )
    where, args = _where(d, since, until)
    sql = f"SELECT {', '.join([*keys, *sums])} FROM requests{where}"
    if keys:
        sql += f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
    return sql, args


def query(
    ledgers: Sequence[str], by: list[str], since: float | None, until: float | None
) -> list[Row]:
    """`ledgers`: SQLite files, or one postgresql:// URL."""
    for dim in by:
        if dim not in DIMENSIONS:
            raise ReportError(f"cannot group by {dim!r}; use {', '.join(DIMENSIONS)}")
    urls = [x for x in ledgers if x.startswith(("postgresql://", "postgres://"))]
    if urls and len(ledgers) > 1:
        raise ReportError("read one PostgreSQL ledger, or one or more SQLite files, not both")
    if urls:
        found = _postgres(urls[0], *_sql(POSTGRES, by, since, until))
    elif len(ledgers) == 1:
        found = _sqlite(ledgers[0], by, since, until)
    else:
        found = _merged(ledgers, by, since, until)
    n = len(by)
    return [Row(tuple(str(v) for v in r[:n]), *r[n:]) for r in found if r[n]]


def _postgres(url: str, sql: str, args: list[float]) -> list[tuple[Any, ...]]:
    from .store.base import StoreUnavailable
    from .store.postgres import query as pg_query  # the optional `postgres` extra

    try:
        return pg_query(url, sql, args)
    except StoreUnavailable as exc:
        raise ReportError(f"cannot read the ledger {exc}") from None


def _sqlite(
    path: str, by: list[str], since: float | None, until: float | None
) -> list[tuple[Any, ...]]:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.OperationalError as exc:
        raise ReportError(f"cannot open the ledger {path}: {exc}") from None
    try:
        with db:
            return db.execute(*_sql(SQLITE, by, since, until)).fetchall()
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"cannot read the ledger {path}: {exc}") from None
    finally:
        db.close()


def _merged(
    paths: Sequence[str], by: list[str], since: float | None, until: float | None
) -> list[tuple[Any, ...]]:
    """Copy each file's rows in the period into one temporary table keyed by request key
    (attaching one file at a time, so any number of files works), then sum that."""
    db = sqlite3.connect("", uri=True)  # a private temporary file, deleted at close
    columns = ", ".join(MERGED)
    where, args = _where(SQLITE, since, until)
    try:
        db.execute(f"CREATE TABLE requests ({columns}, PRIMARY KEY (request_id))")
        for path in paths:
            try:
                db.execute("ATTACH DATABASE ? AS source", (f"file:{path}?mode=ro",))
            except sqlite3.OperationalError as exc:
                raise ReportError(f"cannot open the ledger {path}: {exc}") from None
            try:
                with db:
                    db.execute(
                        f"INSERT OR IGNORE INTO requests SELECT {columns} "
                        f"FROM source.requests{where}",
                        args,
                    )
            except sqlite3.DatabaseError as exc:
                raise ReportError(f"cannot read the ledger {path}: {exc}") from None
            finally:
                db.execute("DETACH DATABASE source")
        return db.execute(*_sql(SQLITE, by, None, None)).fetchall()
    finally:
        db.close()


def _cell(column: str, value: float | int | None) -> str:
    if value is None:
        return "-"
    if column in ("requests", "tokens_in", "tokens_out"):
        return f"{int(value):,}"
    if column == "cost_usd":
        return f"{value:,.4f}"
    if column == "waste_share":
        return f"{value:.1%}"
    if column in ("tokens_per_dollar", "tokens_per_joule"):
        return f"{value:,.1f}"
    return f"{value:,.3f}"


def render(rows: list[Row], by: list[str], fmt: str) -> str:
    header = [*by, *COLUMNS]
    if fmt == "json":
        return (
            orjson.dumps(
                [dict(zip(by, r.keys, strict=True)) | r.values for r in rows],
                option=orjson.OPT_INDENT_2,
            ).decode()
            + "\n"
        )
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for r in rows:
            writer.writerow([*r.keys, *("" if v is None else v for v in r.values.values())])
        return out.getvalue()
    if fmt != "table":
        raise ReportError(f"unknown format {fmt!r}; use table, csv or json")
    table = [header] + [[*r.keys, *(_cell(c, v) for c, v in r.values.items())] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for number, line in enumerate(table):
        cells = [
            cell.ljust(w) if i < len(by) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(no requests in this period)")
    return "\n".join(lines) + "\n"
