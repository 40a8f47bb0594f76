"""`meterproxy usage` reads PostgreSQL exactly as it reads SQLite (same rows, same output in
every format) and merges several SQLite files, a request in two files counted once."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterproxy import cli
from meterproxy.ledger import LEDGER_SCHEMA, REQUESTS, row
from meterproxy.store.base import Store
from meterproxy.store.postgres import PostgresStore
from meterproxy.store.sqlite import SqliteStore
from meterproxy.usage import Source, Usage

from .factories import settlement
from .postgres import PostgresServer, postgres_server

NOW = time.time()
ROWS = [
    row(
        settlement(
            request_id=f"r{i}",
            ts=NOW - (i % 9) * 86400 / 3 - 60,  # spread over three days
            tenant=("research", "support")[i % 2],
            model=("llama", "qwen", "gpt-4o-mini")[i % 3],
            upstream=("gpu", "openai")[i % 3 == 2],
            usage=Usage(10 + i, 3 * i, None, None, Source.UPSTREAM),
            energy_j=None if i % 3 == 2 else 2.5 * i,
            cost_usd=0.001 * i,
            waste_reason="client_disconnect" if i % 7 == 0 else None,
        )
    )
    for i in range(60)
]


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


async def fill(store: Store, rows: list[tuple[object, ...]]) -> None:
    await store.open()
    assert await store.insert(REQUESTS, rows) == []
    await store.close()


def same(fmt: str, a: str, b: str) -> bool:
    """Equal output; numbers equal up to float rounding (the databases sum in their own order)."""
    if fmt == "table":
        return a == b
    if fmt == "json":
        return close(json.loads(a), json.loads(b))
    return close(list(csv.reader(io.StringIO(a))), list(csv.reader(io.StringIO(b))))


def close(x: object, y: object) -> bool:
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(close(p, q) for p, q in zip(x, y, strict=True))
    if isinstance(x, str) and isinstance(y, str) and x != y:
        try:
            return math.isclose(float(x), float(y), rel_tol=1e-12)
        except ValueError:
            return False
    if isinstance(x, float) and isinstance(y, float):
        return math.isclose(x, y, rel_tol=1e-12)
    return x == y


def usage(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert cli.main(["usage", *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
async def test_postgres_and_sqlite_report_the_same(
    pg_server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    url = pg_server.create_database()
    await fill(PostgresStore(url, LEDGER_SCHEMA), ROWS)
    await fill(SqliteStore(str(tmp_path / "l.db"), LEDGER_SCHEMA), ROWS)
    config = tmp_path / "pg.yaml"
    config.write_text(f"upstreams: [{{name: a, url: 'http://x/v1'}}]\nledger: {{url: '{url}'}}\n")
    for by in (["--by", "tenant"], ["--by", "day", "--by", "model"], ["--by", "upstream"]):
        for span in ([], ["--since", "1d"], ["--until", "2d"]):
            options = [*by, *span, "--format", fmt]
            from_pg = usage(capsys, "--config", str(config), *options)
            assert same(fmt, from_pg, usage(capsys, "--ledger", str(tmp_path / "l.db"), *options))
            assert from_pg == usage(capsys, "--ledger", url, *options)
    assert "research" in usage(capsys, "--config", str(config), "--format", fmt)


def test_several_sqlite_files_are_merged_and_a_request_in_two_counts_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    files = [str(tmp_path / f"pod-{n}.db") for n in range(3)]
    asyncio.run(fill(SqliteStore(files[0], LEDGER_SCHEMA), ROWS[:25]))
    asyncio.run(fill(SqliteStore(files[1], LEDGER_SCHEMA), ROWS[20:45]))  # 5 rows in both
    asyncio.run(fill(SqliteStore(files[2], LEDGER_SCHEMA), ROWS[45:]))
    asyncio.run(fill(SqliteStore(str(tmp_path / "all.db"), LEDGER_SCHEMA), ROWS))
    for options in (["--by", "tenant"], ["--by", "day", "--by", "model", "--since", "2d"]):
        merged = usage(
            capsys, *(x for f in files for x in ("--ledger", f)), *options, "--format", "json"
        )
        alone = usage(capsys, "--ledger", str(tmp_path / "all.db"), *options, "--format", "json")
        assert same("json", merged, alone)
    assert cli.main(["usage", "--ledger", files[0], "--ledger", str(tmp_path / "none.db")]) == 1
    assert "no ledger at" in capsys.readouterr().err
    assert cli.main(["usage", "--ledger", files[0], "--ledger", "postgresql://x@h/db"]) == 1
    assert "not both" in capsys.readouterr().err
