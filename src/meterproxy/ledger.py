"""The usage ledger: one row per settled request, in SQLite (the embedded default) or
PostgreSQL (one ledger for a fleet), written off the request path by the shared writer
(`store.writer`): batched, kept through an outage, spilled to a local file when its queue is
full, never doubled (rows are keyed by the proxy's request key).

`add` (a settlement sink) makes every value storable (bounded valid text, integers in range)
and queues the row. The table is declared once (`REQUESTS`) with each backend's migrations; a
schema version is one number for both backends (SQLite: `PRAGMA user_version`; PostgreSQL: the
`schema_version` table), so a migration adds a step to each list with the same version.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .store.base import Store
from .store.schema import Column, Kind, Row, Schema, Table
from .store.writer import Writer

if TYPE_CHECKING:
    from .settlement import Settlement

_V1 = (
    """CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,      -- the proxy's own request key (unique)
    ts REAL NOT NULL,              -- end of the request, Unix seconds (UTC)
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt_tokens INTEGER,
    cached_tokens INTEGER,
    completion_tokens INTEGER,
    reasoning_tokens INTEGER,
    token_source TEXT NOT NULL,    -- upstream | estimate | partial | none
    ttft_s REAL,
    duration_s REAL NOT NULL,
    gpu_seconds REAL NOT NULL,
    energy_j REAL,
    cost_usd REAL NOT NULL,
    priced INTEGER NOT NULL,
    waste_reason TEXT,
    client_request_id TEXT,
    client_user TEXT
)""",
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)",
)
SCHEMA = ";\n".join(_V1) + ";\n"  # version 1, as the first ledgers were created
# SQLite: version -> statements. A file from version 1 has user_version 0 and the table already.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, _V1),
    (
        2,
        (
            "ALTER TABLE requests ADD COLUMN upstream_request_id TEXT",
            "ALTER TABLE requests ADD COLUMN outcome TEXT",
            # Version 1 keyed rows by the client's id when it sent one, which may repeat; those
            # repeats get their row id appended (the client's id stays in client_request_id).
            # From version 2 on the proxy's key is unique: a retried batch never doubles a row.
            "UPDATE requests SET request_id = request_id || '#' || id WHERE id NOT IN "
            "(SELECT min(id) FROM requests GROUP BY request_id)",
            "CREATE UNIQUE INDEX IF NOT EXISTS requests_key ON requests (request_id)",
        ),
    ),
)
# PostgreSQL's history starts at version 2, the row schema it was introduced with.
PG_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        2,
        (
            """CREATE TABLE IF NOT EXISTS requests (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    ts TIMESTAMPTZ NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt_tokens BIGINT,
    cached_tokens BIGINT,
    completion_tokens BIGINT,
    reasoning_tokens BIGINT,
    token_source TEXT NOT NULL,
    ttft_s DOUBLE PRECISION,
    duration_s DOUBLE PRECISION NOT NULL,
    gpu_seconds DOUBLE PRECISION NOT NULL,
    energy_j DOUBLE PRECISION,
    cost_usd DOUBLE PRECISION NOT NULL,
    priced BOOLEAN NOT NULL,
    waste_reason TEXT,
    client_request_id TEXT,
    client_user TEXT,
    upstream_request_id TEXT,
    outcome TEXT
)""",
            "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
T, N, R = Kind.TEXT, Kind.INT, Kind.REAL
REQUESTS = Table(
    "requests",
    tuple(
        Column(name, kind)
        for name, kind in (
            ("request_id", T),
            ("ts", Kind.TIME),
            ("tenant", T),
            ("model", T),
            ("upstream", T),
            ("endpoint", T),
            ("status", T),
            ("prompt_tokens", N),
            ("cached_tokens", N),
            ("completion_tokens", N),
            ("reasoning_tokens", N),
            ("token_source", T),
            ("ttft_s", R),
            ("duration_s", R),
            ("gpu_seconds", R),
            ("energy_j", R),
            ("cost_usd", R),
            ("priced", Kind.BOOL),
            ("waste_reason", T),
            ("client_request_id", T),
            ("client_user", T),
            ("upstream_request_id", T),
            ("outcome", T),
        )
    ),
    key=("request_id",),
    time="ts",
)
LEDGER_SCHEMA = Schema(
    "ledger", (REQUESTS,), sqlite=MIGRATIONS, postgres=PG_MIGRATIONS, sqlite_user_version=True
)
COLUMNS = REQUESTS.names
# Bounds on what is stored: text columns at most this many characters, integers 64-bit.
MAX_TEXT = 256
INT_MAX = 2**63 - 1


def storable_text(value: str | None) -> str | None:
    """Bounded, valid UTF-8 (no lone surrogates), no NUL: every backend stores it as given."""
    if value is None:
        return None
    value = value[:MAX_TEXT]
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def storable_int(value: int | None) -> int | None:
    if value is None:
        return None
    return min(max(value, -INT_MAX), INT_MAX)


def storable_real(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _labels(s: Settlement) -> tuple[str | None, ...]:
    """tenant, model, upstream, endpoint, status, made storable: they come from configuration,
    upstream model lists and enums, so a few sets recur; each is checked once."""
    key = (s.tenant, s.model, s.upstream, s.endpoint, s.status)
    found = _LABELS.get(key)
    if found is None:
        if len(_LABELS) >= _MAX_LABELS:
            _LABELS.clear()
        found = _LABELS[key] = tuple(map(storable_text, key))
    return found


_LABELS: dict[tuple[str, ...], tuple[str | None, ...]] = {}
_MAX_LABELS = 4096


def row(s: Settlement) -> Row:
    u = s.usage
    ttft = s.ttft_ns
    text, num, real = storable_text, storable_int, storable_real
    tenant, model, upstream, endpoint, status = _labels(s)
    # Most values are None or in range: checked inline, a call only when there is work.
    prompt, completion, cached, reasoning = u.prompt, u.completion, u.cached_prompt, u.reasoning
    return (
        text(s.request_id),
        real(s.ts),
        tenant,
        model,
        upstream,
        endpoint,
        status,
        prompt if prompt is None or 0 <= prompt <= INT_MAX else num(prompt),
        cached if cached is None or 0 <= cached <= INT_MAX else num(cached),
        completion if completion is None or 0 <= completion <= INT_MAX else num(completion),
        reasoning if reasoning is None or 0 <= reasoning <= INT_MAX else num(reasoning),
        u.source.value,
        None if ttft is None else ttft / 1e9,
        s.duration_ns / 1e9,
        real(s.gpu_seconds) or 0.0,
        None if s.energy_j is None else real(s.energy_j),
        real(s.cost_usd) or 0.0,
        int(s.priced),
        s.waste_reason,
        None if s.client_request_id is None else text(s.client_request_id),
        None if s.client_user is None else text(s.client_user),
        None if s.upstream_request_id is None else text(s.upstream_request_id),
        s.outcome.value,
    )


class Ledger(Writer):
    """The writer of `requests` rows, fed by settlements."""

    def __init__(self, store: Store, **options: Any) -> None:
        super().__init__(store, REQUESTS, **options)

    @property
    def path(self) -> str:
        """Where the rows go: the SQLite file, or the PostgreSQL URL without its password."""
        return self.store.where

    def add(self, settlement: Settlement) -> None:
        """Settlement sink: queue the row; never blocks, never does I/O."""
        self.put(row(settlement))
