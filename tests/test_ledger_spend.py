"""What the ledger says a tenant spent: by period, leaving out given rows, with a watermark that
tells later which rows a read saw."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterproxy.ledger import Ledger
from meterproxy.ledger_spend import LedgerReadError, Span, Spend, SqliteSpend
from meterproxy.usage import Source, Usage

from .factories import settlement

DAY = Span(1_700_000_000.0, 1_700_086_400.0)
MONTH = Span(1_699_000_000.0, 1_701_000_000.0)


async def test_sums_by_period_with_exclusions_and_a_watermark(tmp_path: Path) -> None:
    path = str(tmp_path / "usage.db")
    reader = SqliteSpend(path)
    assert reader.spend("research", DAY, MONTH, ()) == (Spend(), "0")  # no ledger yet
    ledger = Ledger(path, on_error=lambda kind: None)
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
