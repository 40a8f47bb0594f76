"""`meterproxy leaderboard`: tenants, users or models ranked by what their tokens bought.

Read from the ledger's database (read-only; safe while the proxy writes): every request in the
period that reached an upstream, grouped into its task (x-meterproxy-task, else the request
alone), joined with the task's last reported outcome. Per group: successful tasks, success
rate (successes / rated tasks), USD and joules per successful task (every attempt of every
task - failed, unrated, retried, duplicate - divided by the successful tasks), waste share by
reason, duplicate share. Raw tokens are shown as context and never rank anything.

A task belongs to the model (and user) that served most of its tokens. Client `user` ids are
shown only as configured aliases (value.user_aliases) or short salted hashes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson

from ..report import ReportError
from .duplicates import salt_key

BY = ("tenant", "user", "model")
RANKS = ("usd", "joules", "successes", "success_rate")
REASONS = ("duplicate", "truncated", "client_disconnect", "upstream_error")
SHORT = {
    "duplicate": "dup",
    "truncated": "trunc",
    "client_disconnect": "disc",
    "upstream_error": "err",
}
# A group is flagged when at least this share of its traffic is of one kind.
FLAG_SHARE = 0.5
NO_USER = "(none)"

_TASKS = """
WITH r AS (
    SELECT q.tenant AS tenant,
           coalesce(t.task_id, q.request_id) AS task,
           q.model AS model,
           q.client_user AS user,
           q.cost_usd AS cost,
           coalesce(q.energy_j, 0) AS energy,
           coalesce(q.prompt_tokens, 0) + coalesce(q.completion_tokens, 0) AS tokens,
           coalesce(q.completion_tokens, 0) AS completion,
           q.waste_reason AS waste,
           coalesce(t.duplicate, 0) AS duplicate
    FROM requests q LEFT JOIN {task_requests} t ON t.request_id = q.request_id
    WHERE (q.outcome IS NULL OR q.outcome != 'refused') AND q.ts >= ? AND q.ts < ?
)
SELECT r.tenant, r.task, r.model, r.user,
       count(*), sum(r.cost), sum(r.energy), sum(r.tokens), sum(r.completion),
       {waste},
       sum(CASE WHEN r.waste = 'truncated' THEN 1 ELSE 0 END),
       sum(r.duplicate),
       max(o.success), max(o.score)
FROM r LEFT JOIN {task_outcomes} o ON o.tenant = r.tenant AND o.task_id = r.task
GROUP BY r.tenant, r.task, r.model, r.user
"""
_WASTE = ", ".join(
    f"sum(CASE WHEN r.waste = '{reason}' THEN r.completion ELSE 0 END)" for reason in REASONS
)
# Stand-ins when the value tables do not exist (a ledger written before them).
_NO_TASK_REQUESTS = "(SELECT NULL AS request_id, NULL AS task_id, 0 AS duplicate WHERE 0)"
_NO_TASK_OUTCOMES = (
    "(SELECT NULL AS tenant, NULL AS task_id, NULL AS success, NULL AS score WHERE 0)"
)


@dataclass
class Task:
    tenant: str
    success: bool | None  # None: no outcome reported
    requests: int = 0
    cost_usd: float = 0.0
    energy_j: float = 0.0
    tokens: int = 0
    completion: int = 0
    wasted: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # requests
    duplicates: int = 0  # requests
    tokens_by: dict[tuple[str, str | None], int] = field(default_factory=dict)  # (model, user)

    def owner(self, by: str) -> str | None:
        """The model or user that served most of this task's tokens (first seen on a tie)."""
        totals: dict[str | None, int] = {}
        for (model, user), tokens in self.tokens_by.items():
            name = model if by == "model" else user
            totals[name] = totals.get(name, 0) + tokens
        return max(totals, key=lambda n: totals[n])


@dataclass
class Group:
    key: str
    tasks: int = 0
    successes: int = 0
    failures: int = 0
    requests: int = 0
    cost_usd: float = 0.0
    energy_j: float = 0.0
    tokens: int = 0
    completion: int = 0
    unrated_tokens: int = 0
    wasted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    truncated: int = 0
    duplicates: int = 0

    def add(self, task: Task) -> None:
        self.tasks += 1
        self.successes += task.success is True
        self.failures += task.success is False
        self.requests += task.requests
        self.cost_usd += task.cost_usd
        self.energy_j += task.energy_j
        self.tokens += task.tokens
        self.completion += task.completion
        self.unrated_tokens += task.tokens if task.success is None else 0
        for reason, tokens in task.wasted.items():
            self.wasted[reason] += tokens
        self.truncated += task.truncated
        self.duplicates += task.duplicates

    @property
    def values(self) -> dict[str, float | int | str | None]:
        rated, s = self.successes + self.failures, self.successes
        share = _share
        waste = sum(self.wasted.values())
        return {
            "successes": self.successes,
            "tasks": self.tasks,
            "success_rate": share(self.successes, rated),
            "usd_per_success": self.cost_usd / s if s else None,
            "joules_per_success": self.energy_j / s if s and self.energy_j else None,
            "cost_usd": self.cost_usd,
            "energy_j": self.energy_j,
            "unrated_share": share(self.tasks - rated, self.tasks),
            "duplicate_share": share(self.duplicates, self.requests),
            "waste_share": share(waste, self.completion),
            **{f"waste_{r}": share(self.wasted[r], self.completion) for r in REASONS},
            "requests": self.requests,
            "tokens": self.tokens,
            "flags": " ".join(self.flags),
        }

    @property
    def flags(self) -> list[str]:
        flags = []
        if self.requests and self.duplicates / self.requests >= FLAG_SHARE:
            flags.append("duplicates")
        if self.requests and self.truncated / self.requests >= FLAG_SHARE:
            flags.append("truncations")
        if self.tokens and self.unrated_tokens / self.tokens >= FLAG_SHARE:
            flags.append("unrated")
        return flags


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class Names:
    """How a client `user` id is shown: its alias, else `u:` and 8 hex digits of a keyed hash."""

    def __init__(self, salt: str | None, aliases: Mapping[str, str]) -> None:
        self._key = None if salt is None else salt_key(salt)
        self._aliases = aliases

    def user(self, raw: str | None) -> str:
        if raw is None:
            return NO_USER
        alias = self._aliases.get(raw)
        if alias is not None:
            return alias
        if self._key is None:
            raise ReportError(
                "users are shown as salted hashes and no salt was found: run the proxy once "
                "with this ledger, or set value.salt and pass --config"
            )
        return "u:" + hashlib.blake2b(raw.encode(), key=self._key, digest_size=4).hexdigest()


def stored_salt(path: str) -> str | None:
    db = _open(path)
    try:
        if not _has(db, "value_meta"):
            return None
        found = db.execute("SELECT value FROM value_meta WHERE key = 'salt'").fetchone()
        return None if found is None else str(found[0])
    finally:
        db.close()


def tasks(path: str, since: float, until: float) -> list[Task]:
    db = _open(path)
    try:
        sql = _TASKS.format(
            task_requests="task_requests" if _has(db, "task_requests") else _NO_TASK_REQUESTS,
            task_outcomes="task_outcomes" if _has(db, "task_outcomes") else _NO_TASK_OUTCOMES,
            waste=_WASTE,
        )
        rows = db.execute(sql, (since, until)).fetchall()
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"cannot read the ledger {path}: {exc}") from None
    finally:
        db.close()
    found: dict[tuple[str, str], Task] = {}
    for tenant, task_id, model, user, n, cost, energy, tokens, completion, *rest in rows:
        wasted, (truncated, duplicates, success, _score) = rest[: len(REASONS)], rest[-4:]
        task = found.get((tenant, task_id))
        if task is None:
            outcome = None if success is None else bool(success)
            task = found[(tenant, task_id)] = Task(tenant, outcome)
        task.requests += n
        task.cost_usd += cost or 0.0
        task.energy_j += energy or 0.0
        task.tokens += tokens
        task.completion += completion
        for reason, value in zip(REASONS, wasted, strict=True):
            task.wasted[reason] = task.wasted.get(reason, 0) + value
        task.truncated += truncated
        task.duplicates += duplicates
        task.tokens_by[(model, user)] = task.tokens_by.get((model, user), 0) + tokens
    return list(found.values())


def board(found: list[Task], by: str, names: Names, rank: str = "usd") -> list[Group]:
    if by not in BY:
        raise ReportError(f"cannot rank by {by!r}; use {', '.join(BY)}")
    if rank not in RANKS:
        raise ReportError(f"cannot rank on {rank!r}; use {', '.join(RANKS)}")
    groups: dict[str, Group] = {}
    for task in found:
        if by == "tenant":
            key = task.tenant
        elif by == "model":
            key = task.owner("model") or "-"
        else:
            key = names.user(task.owner("user"))
        groups.setdefault(key, Group(key)).add(task)
    return sorted(groups.values(), key=_ranking(rank))


def _ranking(rank: str) -> Callable[[Group], tuple[float | str, ...]]:
    inf = float("inf")

    def key(g: Group) -> tuple[float, ...]:
        s = g.successes
        usd = g.cost_usd / s if s else inf
        joules = g.energy_j / s if s and g.energy_j else inf
        rate = s / (s + g.failures) if s + g.failures else -1.0
        if rank == "usd":
            return (s == 0, usd, joules, -s)
        if rank == "joules":
            return (s == 0, joules, usd, -s)
        if rank == "successes":
            return (-s, usd, joules)
        return (-rate, -s, usd)

    return lambda g: (*key(g), g.key)


def _open(path: str) -> sqlite3.Connection:
    try:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.OperationalError as exc:
        raise ReportError(f"cannot open the ledger {path}: {exc}") from None


def _has(db: sqlite3.Connection, table: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(query, (table,)).fetchone() is not None


# -- output -------------------------------------------------------------------------------

TABLE_COLUMNS = (
    "successes",
    "tasks",
    "success_rate",
    "usd_per_success",
    "joules_per_success",
    "duplicate_share",
    "waste",
    "tokens",
    "flags",
)


def _cell(column: str, value: float | int | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if column in ("successes", "tasks", "tokens", "requests"):
        return f"{int(value):,}"
    if column.endswith("_share") or column == "success_rate" or column.startswith("waste_"):
        return f"{value:.1%}"
    if column == "usd_per_success":
        return f"{value:,.6f}" if value < 1 else f"{value:,.2f}"
    return f"{value:,.1f}"


def _waste_cell(values: Mapping[str, float | int | str | None]) -> str:
    parts = []
    for reason in REASONS:
        share = values[f"waste_{reason}"]
        if isinstance(share, float) and share > 0:
            parts.append(f"{SHORT[reason]} {share:.1%}")
    return ", ".join(parts) or "-"


def render(groups: list[Group], by: str, fmt: str) -> str:
    rows = [{"rank": i + 1, by: g.key, **g.values} for i, g in enumerate(groups)]
    if fmt == "json":
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "csv":
        out = io.StringIO()
        header = ["rank", by, *Group("").values]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if row[c] is None else row[c] for c in header])
        return out.getvalue()
    if fmt != "table":
        raise ReportError(f"unknown format {fmt!r}; use table, csv or json")
    header = ["rank", by, *TABLE_COLUMNS]
    table = [header]
    for row in rows:
        cells = [str(row["rank"]), str(row[by])]
        for column in TABLE_COLUMNS:
            cells.append(_waste_cell(row) if column == "waste" else _cell(column, row[column]))
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    left = {1, len(header) - 1, header.index("waste")}  # names and text left, numbers right
    for number, line in enumerate(table):
        cells = [
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(no requests in this period)")
    lines.append(
        "ranked by value: cost per successful task counts every attempt (failed, unrated, "
        "retried, duplicate); tokens are context, never the rank"
    )
    return "\n".join(lines) + "\n"
