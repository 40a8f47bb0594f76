"""Quota arithmetic without I/O: exact sliding windows, calendar budgets, reservations."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from meterproxy.errors import QuotaExhausted, RateLimited
from meterproxy.policy import Limits, Tenant
from meterproxy.quota import WINDOW_NS, Quota, SlidingLog, duration

S = 1_000_000_000
NOON = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc).timestamp()


def tenant(**limits: int | float) -> Tenant:
    return Tenant("research", limits=Limits(**limits))  # type: ignore[arg-type]


def test_the_sliding_window_never_allows_twice_the_limit_across_a_boundary() -> None:
    quota, t = Quota("UTC"), tenant(requests_per_minute=10)
    admitted = []
    # Hammer every 100 ms for three minutes: any 60 s span may hold at most 10 admissions.
    for step in range(1800):
        now = step * S // 10
        try:
            quota.admit(t, 0, now, NOON)
            admitted.append(now)
        except RateLimited:
            pass
    for i, start in enumerate(admitted):
        in_window = [a for a in admitted[i:] if a < start + WINDOW_NS]
        assert len(in_window) <= 10
    assert len(admitted) == 30  # and it is not stingier than the limit either


def test_refusal_says_when_to_retry_and_carries_openai_headers() -> None:
    quota, t = Quota("UTC"), tenant(requests_per_minute=2, tokens_per_minute=1000)
    quota.admit(t, 100, 0, NOON)
    quota.admit(t, 100, 20 * S, NOON)
    with pytest.raises(RateLimited) as caught:
        quota.admit(t, 100, 30 * S, NOON)
    error = caught.value
    assert (error.type, error.code, error.limit) == (
        "requests",
        "rate_limit_exceeded",
        "requests_per_minute",
    )
    assert error.headers["retry-after"] == "30"  # the first admission leaves the window at 60 s
    assert error.headers["x-ratelimit-limit-requests"] == "2"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    # OpenAI: the time until the limit is back to its initial state (both have aged out)
    assert error.headers["x-ratelimit-reset-requests"] == "50s"
    assert error.headers["x-ratelimit-remaining-tokens"] == "800"
    assert "2 of 2 requests in the last minute" in error.message


def test_tokens_are_reserved_then_settled_to_real_usage() -> None:
    quota, t = Quota("UTC"), tenant(tokens_per_minute=1000, tokens_per_day=5000)
    ticket = quota.admit(t, 900, 0, NOON)
    with pytest.raises(RateLimited) as caught:
        quota.admit(t, 200, S, NOON)
    assert caught.value.type == "tokens"
    quota.settle(ticket, 150, 0.0, 0.0, 2 * S, NOON)  # the request really used 150
    assert quota.state("research").tokens.total == 150
    quota.admit(t, 800, 3 * S, NOON)  # fits now: 150 + 800 <= 1000
    assert quota.used("research", "tokens", "2026-11-22") == 150


def test_day_budget_follows_the_calendar_in_the_configured_zone() -> None:
    quota, t = Quota("Europe/Paris"), tenant(tokens_per_day=1000)
    ticket = quota.admit(t, 0, 0, NOON)
    quota.settle(ticket, 1000, 0.0, 0.0, S, NOON)
    with pytest.raises(QuotaExhausted) as caught:
        quota.admit(t, 0, 2 * S, NOON)
    error = caught.value
    assert (error.type, error.code) == ("insufficient_quota", "insufficient_quota")
    assert error.message == (
        "tenant `research` has used 1,000 of 1,000 tokens today; resets at 2026-11-23 00:00 CET"
    )
    assert error.headers["retry-after"] == str(11 * 3600)  # 13:00 CET -> midnight CET
    next_day = NOON + 12 * 3600
    quota.admit(t, 0, 3 * S, next_day)  # a new day in Paris


def test_concurrency_and_month_dollars() -> None:
    quota, t = Quota("UTC"), tenant(max_concurrent=1, usd_per_month=1.0)
    ticket = quota.admit(t, 0, 0, NOON)
    with pytest.raises(RateLimited) as caught:
        quota.admit(t, 0, 0, NOON)
    assert caught.value.limit == "max_concurrent"
    quota.settle(ticket, 10, 1.25, 0.0, S, NOON)
    with pytest.raises(QuotaExhausted, match=r"1\.25 of 1\.00 USD this month"):
        quota.admit(t, 0, 2 * S, NOON)
    assert quota.ratios(t, 2 * S, NOON) == {"usd_per_month": 1.25, "max_concurrent": 0.0}


def test_sliding_log_wait_and_reset_format() -> None:
    log = SlidingLog()
    log.add(0, 5)
    log.add(10 * S, 5)
    assert log.wait_ns(20 * S, 6, 10) == 50 * S  # both entries must age out
    assert log.wait_ns(20 * S, 3, 10) == 40 * S
    assert [duration(n) for n in (0, 20_000_000, 1_500_000_000, 360 * S)] == [
        "0ms",
        "20ms",
        "1.5s",
        "6m0s",
    ]


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/Santiago", "Australia/Lord_Howe"])
def test_periods_are_the_calendars_whatever_was_asked_before(zone: str) -> None:
    """Periods are kept for the day they were computed in: the answer is still the calendar's
    across midnights, month ends and daylight-saving changes, asked in any order."""
    kept = Quota(zone)
    start = datetime(2026, 3, 27, tzinfo=timezone.utc).timestamp()  # DST in Europe, Oceania
    times = [start + k * 1799.5 for k in range(4 * 48)]
    times += [
        datetime(2026, 4, 30, 21, 59, 59, tzinfo=timezone.utc).timestamp() + k for k in (0, 1, 2)
    ]
    times += [datetime(2026, 9, 5, 3, tzinfo=timezone.utc).timestamp() + k * 600 for k in range(12)]
    for now_s in [*times, *reversed(times)]:
        assert kept.periods(now_s) == Quota(zone).periods(now_s), (zone, now_s)


def test_a_busy_window_is_kept_flat_and_adjusted_by_sequence_number() -> None:
    log = SlidingLog()
    entries = [log.add(i * 1000, 2) for i in range(100_000)]  # 100,000 requests in 0.1 s
    now = WINDOW_NS + 50_000_000
    log.expire(now)  # those up to 50 ms old at the window's start are gone, and cut off
    assert log.total == 2 * 49_999
    log.adjust(entries[10], 2, 5, now)  # long expired: only the excess counts, now
    assert log.total == 2 * 49_999 + 3
    log.adjust(entries[-1], 2, 7, now)  # in the window: corrected where it stands
    assert log.total == 2 * 49_999 + 3 + 5
    assert log.wait_ns(now, 4, log.total) == 2000  # the two oldest left go in 2 µs
    log.expire(now + WINDOW_NS)
    assert log.total == 0 and log.wait_ns(now + WINDOW_NS, 1, 10) == WINDOW_NS
