"""What the ledger says a tenant spent: by period, leaving out given rows, with a watermark that
tells later which rows a read saw."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from meterproxy.ledger import LEDGER_SCHEMA, Ledger
from meterproxy.ledger_spend import (
    LedgerReadError,
    PostgresSpend,
    Span,
    Spend,
    SqliteSpend,
    ledger_reader,
)
from meterproxy.store.base import open_store
from meterproxy.store.sqlite import SqliteStore
from meterproxy.usage import Source, Usage

from .factories import settlement
from .postgres import PostgresServer, postgres_server

DAY = Span(1_700_000_000.0, 1_700_086_400.0)
MONTH = Span(1_699_000_000.0, 1_701_000_000.0)


async def test_sums_by_period_with_exclusions_and_a_watermark(tmp_path: Path) -> None:
    path = str(tmp_path / "usage.db")
    reader = SqliteSpend(path)
    assert reader.spend("research", DAY, MONTH, ()) == (Spend(), "0")  # no ledger yet
    ledger = Ledger(open_store(f"sqlite:///{path}", LEDGER_SCHEMA), on_error=lambda kind: None)
    await ledger.open()

    def row(key: str, ts: float, tokens: int, usd: float, joules: float | None) -> None:
        ledger.add(
            settlement(
                request_id=key,
                tenant="research",
                ts=ts,
                usage=Usage(tokens, None, None, None, Source.UPSTREAM),
                cost_usd=usd,
                energy_j=joules,
            )
        )

    row("a", DAY.start_s + 10, 100, 1.0, 5.0)
    row("b", DAY.start_s + 20, 50, 0.5, None)  # energy unknown: counts as none
    row("c", DAY.start_s - 10, 1000, 2.0, 7.0)  # the day before, same month
    ledger.add(settlement(request_id="d", tenant="support", ts=DAY.start_s + 5))
    await ledger.flush()
    spend, watermark = reader.spend("research", DAY, MONTH, ())
    assert spend == Spend(tokens=150, usd=3.5, joules=5.0) and watermark == "4"
    assert reader.spend("research", DAY, MONTH, ["a", "c"])[0] == Spend(50, 0.5, 0.0)
    row("e", DAY.start_s + 30, 1, 0.0, None)  # written after that read
    await ledger.flush()
    assert reader.counted(["a", "e", "zz"], watermark) == {"a"}
    assert reader.counted(["a", "e"], "5") == {"a", "e"}
    await ledger.close()
    assert reader.identity.startswith("sqlite:") and reader.identity.endswith("usage.db")


def test_an_unreadable_ledger_is_a_read_error(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerReadError, match=r"usage\.db"):
        SqliteSpend(str(path)).spend("research", DAY, MONTH, ())


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


async def test_postgres_sums_and_a_snapshot_that_knows_what_it_saw(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """Writers commit in any order: a row written before the read but committed after it was
    not in the read, whatever its id."""
    url = pg_server.create_database()
    ledger = Ledger(
        open_store(url, LEDGER_SCHEMA),
        spill=SqliteStore(str(tmp_path / "spill.db"), LEDGER_SCHEMA),
        on_error=lambda kind: None,
    )
    await ledger.open()
    reader = ledger_reader(url)
    assert isinstance(reader, PostgresSpend)
    assert reader.identity == f"postgresql:127.0.0.1:{pg_server.port}/{url.rsplit('/', 1)[1]}"

    def add(key: str, ts: float, tokens: int, usd: float) -> None:
        ledger.add(
            settlement(
                request_id=key,
                tenant="research",
                ts=ts,
                usage=Usage(tokens, None, None, None, Source.UPSTREAM),
                cost_usd=usd,
                energy_j=2.0,
            )
        )

    add("a", DAY.start_s + 10, 100, 1.0)
    add("b", DAY.start_s - 10, 1000, 2.0)  # the day before, same month
    await ledger.flush()
    slow = psycopg.connect(url)  # a writer whose transaction is open across the read
    slow.execute(
        "INSERT INTO requests (request_id, ts, tenant, model, upstream, endpoint, status, "
        "prompt_tokens, token_source, duration_s, gpu_seconds, cost_usd, priced) VALUES "
        "('slow', to_timestamp(%s), 'research', 'm', 'u', 'chat_completions', '200', 7, "
        "'upstream', 0.1, 0, 0.5, true)",
        (DAY.start_s + 20,),
    )
    add("d", DAY.start_s + 25, 1, 0.0)  # committed before the read, with a higher id
    await ledger.flush()
    spend, watermark = reader.spend("research", DAY, MONTH, ["b"])
    assert spend == Spend(tokens=101, usd=1.0, joules=4.0)  # b left out; `slow` not committed
    slow.commit()
    slow.close()
    add("c", DAY.start_s + 30, 5, 0.0)  # after the read
    await ledger.flush()
    assert reader.counted(["a", "b", "slow", "c", "d", "zz"], watermark) == {"a", "b", "d"}
    assert reader.spend("research", DAY, MONTH, ())[0].tokens == 100 + 7 + 1 + 5
    await ledger.close()
