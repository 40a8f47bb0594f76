"""`meterproxy usage`: the ledger summed by tenant, model, upstream and/or day, as a table,
CSV or JSON. Reads the SQLite file directly (read-only); safe while the proxy is writing.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson

DIMENSIONS = {
    "tenant": "tenant",
    "model": "model",
    "upstream": "upstream",
    "day": "date(ts, 'unixepoch')",
}
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


def query(path: str, by: list[str], since: float | None, until: float | None) -> list[Row]:
    for dim in by:
        if dim not in DIMENSIONS:
            raise ReportError(f"cannot group by {dim!r}; use {', '.join(DIMENSIONS)}")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.OperationalError as exc:
        raise ReportError(f"cannot open the ledger {path}: {exc}") from None
    keys = [DIMENSIONS[d] for d in by]
    sums = (
        "count(*)",
        "coalesce(sum(prompt_tokens), 0)",
        "coalesce(sum(completion_tokens), 0)",
        "coalesce(sum(energy_j), 0)",
        "coalesce(sum(cost_usd), 0)",
        "coalesce(sum(CASE WHEN waste_reason IS NOT NULL THEN completion_tokens END), 0)",
    )
    select = ", ".join([*keys, *sums])
    where, args = [], []
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if until is not None:
        where.append("ts < ?")
        args.append(until)
    sql = f"SELECT {select} FROM requests"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if keys:
        sql += f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
    try:
        with db:
            rows = db.execute(sql, args).fetchall()
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"cannot read the ledger {path}: {exc}") from None
    finally:
        db.close()
    n = len(keys)
    return [Row(tuple(str(v) for v in r[:n]), *r[n:]) for r in rows if r[n]]


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
