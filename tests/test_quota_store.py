"""Quota spend survives a restart: settled day and month amounts saved to SQLite and loaded at
startup for the current periods only (in the quota's time zone)."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from meterproxy.policy import Tenant
from meterproxy.quota import Quota
from meterproxy.quota_store import QuotaStore

# 2026-03-31 23:30 UTC: still March in UTC, already April 1st in Paris.
NOW_S = datetime(2026, 3, 31, 23, 30, tzinfo=timezone.utc).timestamp()
S = 1_000_000_000


def spend(quota: Quota, tenant: str, tokens: int, usd: float, joules: float) -> None:
    ticket = quota.admit(Tenant(tenant), 0, 10 * S, NOW_S)
    quota.settle(ticket, tokens, usd, joules, 11 * S, NOW_S)


def rows(path: Path) -> set[tuple[str, str, str, float]]:
    with sqlite3.connect(path) as db:
        return set(db.execute("SELECT tenant, kind, period, used FROM spend").fetchall())


async def test_spend_is_saved_and_restored_for_the_current_periods(tmp_path: Path) -> None:
    path = tmp_path / "state" / "quota.db"  # its folder is created
    quota = Quota("UTC")
    store = QuotaStore(str(path), quota)
    await store.open(NOW_S)
    spend(quota, "research", 120, 0.25, 900.0)
    spend(quota, "research", 30, 0.0, 0.0)
    spend(quota, "ops", 7, 0.0, 0.0)
    await store.close()
    assert rows(path) == {
        ("research", "tokens", "2026-03-31", 150.0),
        ("research", "usd", "2026-03", 0.25),
        ("research", "joules", "2026-03-31", 900.0),
        ("ops", "tokens", "2026-03-31", 7.0),
    }
    restored = Quota("UTC")
    again = QuotaStore(str(path), restored)
    await again.open(NOW_S)
    assert restored.used("research", "tokens", "2026-03-31") == 150.0
    assert restored.used("research", "usd", "2026-03") == 0.25
    assert restored.used("research", "joules", "2026-03-31") == 900.0
    assert restored.used("ops", "tokens", "2026-03-31") == 7.0
    assert restored.dirty == set()  # loading is not spending
    await again.close()


async def test_only_the_current_day_and_month_are_loaded(tmp_path: Path) -> None:
    path = tmp_path / "quota.db"
    quota = Quota("UTC")
    store = QuotaStore(str(path), quota)
    await store.open(NOW_S)
    spend(quota, "research", 150, 0.25, 0.0)
    await store.close()
    next_day = NOW_S + 3600  # 2026-04-01 00:30 UTC: a new day and a new month
    restored = Quota("UTC")
    again = QuotaStore(str(path), restored)
    await again.open(next_day)
    assert restored.states.get("research") is None
    await again.close()
    # In Paris it was April 1st already: the UTC rows are of other periods there.
    paris = Quota("Europe/Paris")
    there = QuotaStore(str(path), paris)
    await there.open(NOW_S)
    assert paris.states.get("research") is None
    await there.close()


async def test_a_later_save_overwrites_the_period_total(tmp_path: Path) -> None:
    path = tmp_path / "quota.db"
    quota = Quota("UTC")
    store = QuotaStore(str(path), quota)
    await store.open(NOW_S)
    spend(quota, "research", 100, 0.0, 0.0)
    await store.save()
    assert rows(path) == {("research", "tokens", "2026-03-31", 100.0)}
    spend(quota, "research", 50, 0.0, 0.0)
    await store.save()
    assert rows(path) == {("research", "tokens", "2026-03-31", 150.0)}
    assert quota.dirty == set()
    await store.save()  # nothing dirty: nothing to write
    await store.close()


async def test_run_saves_every_interval(tmp_path: Path) -> None:
    path = tmp_path / "quota.db"
    quota = Quota("UTC")
    store = QuotaStore(str(path), quota, interval_s=0.01)
    await store.open(NOW_S)
    task = asyncio.create_task(store.run())
    spend(quota, "research", 42, 0.0, 0.0)
    for _ in range(100):
        if not quota.dirty:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await store.close()
    assert rows(path) == {("research", "tokens", "2026-03-31", 42.0)}
