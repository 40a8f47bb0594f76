"""Admission against each tenant's limits, and settlement of what was admitted. Pure: clocks
are passed in, nothing here does I/O.

Per-minute limits use an exact sliding log (no fixed buckets, so never 2x at a boundary): a
request is admitted only if the last 60 s plus this request stay within the limit. Tokens are
reserved at admission (prompt estimate + the output cap for each answer asked for) and
corrected to real usage at settlement. A request with no output cap reserves a default; it is
admitted while its window or budget is not yet full (so concurrent uncapped requests overspend
by at most one request's actual excess), a capped one only if its whole reservation fits.
Day and month budgets follow the calendar in the configured time zone.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from .errors import QuotaExhausted, RateLimited
from .policy import Limits, Tenant

WINDOW_NS = 60_000_000_000


class SlidingLog:
    """Amounts admitted in the last 60 s, oldest first, in two flat int64 arrays (times and
    amounts) with a moving head: no object per entry. (A minute of entries as objects, at
    thousands of requests a second, made each full garbage collection walk hundreds of
    thousands of them: tens of milliseconds with the loop stopped.) An entry is known by its
    sequence number, and can be adjusted in place while it is in the window."""

    __slots__ = ("_amounts", "_dropped", "_head", "_times", "total")

    def __init__(self) -> None:
        self._times = array("q")
        self._amounts = array("q")
        self._head = 0  # the oldest entry still in the window
        self._dropped = 0  # entries cut off the front of the arrays so far
        self.total = 0

    def expire(self, now_ns: int) -> None:
        horizon = now_ns - WINDOW_NS
        times, amounts, head = self._times, self._amounts, self._head
        while head < len(times) and times[head] <= horizon:
            self.total -= amounts[head]
            head += 1
        if head > 1024 and 2 * head > len(times):  # most of the arrays is past: cut it off
            del times[:head]
            del amounts[:head]
            self._dropped += head
            head = 0
        self._head = head

    def add(self, now_ns: int, amount: int) -> int:
        """Returns the entry's sequence number."""
        self._times.append(now_ns)
        self._amounts.append(amount)
        self.total += amount
        return self._dropped + len(self._times) - 1

    def adjust(self, entry: int, reserved: int, actual: int, now_ns: int) -> None:
        """Entry `entry`, added with `reserved`, really used `actual`."""
        i = entry - self._dropped
        if i >= 0 and self._times[i] > now_ns - WINDOW_NS:  # still in the window: correct it
            self.total += actual - self._amounts[i]
            self._amounts[i] = actual
        elif actual > reserved:  # expired already; usage beyond the reservation counts now
            self.add(now_ns, actual - reserved)

    def wait_ns(self, now_ns: int, need: int, limit: int) -> int:
        """How long until `need` more fits under `limit`."""
        excess = self.total + need - limit
        times, amounts = self._times, self._amounts
        for i in range(self._head, len(times)):
            excess -= amounts[i]
            if excess <= 0:
                return times[i] + WINDOW_NS - now_ns
        return WINDOW_NS


@dataclass
class TenantState:
    requests: SlidingLog = field(default_factory=SlidingLog)
    tokens: SlidingLog = field(default_factory=SlidingLog)
    concurrent: int = 0
    reserved_today: int = 0  # tokens admitted but not yet settled
    # (kind, period) -> amount settled: ("tokens", "2026-11-22"), ("usd", "2026-11"), ...
    spend: dict[tuple[str, str], float] = field(default_factory=dict)


@dataclass(eq=False)
class Ticket:
    """What one admission took; handed back at settlement."""

    tenant: str
    reserved: int
    request_entry: int | None  # sequence numbers in the tenant's sliding logs
    token_entry: int | None
    day: str
    settled: bool = False  # settlement replaces the reservation once, however often it comes


def duration(ns: int) -> str:
    """OpenAI's reset format: 1s, 6m0s, 20ms."""
    ms = max(0, math.ceil(ns / 1e6))
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


Periods = tuple[str, str, datetime, datetime]  # day, month, next day's and month's start


# -- refusals: one wording and one set of headers for every backend (in-process, host, Redis) --

# (limit name, spend kind, unit, calendar) of each day or month budget, in the order checked.
BUDGETS: tuple[tuple[str, str, str, str], ...] = (
    ("tokens_per_day", "tokens", "tokens today", "day"),
    ("usd_per_month", "usd", "USD this month", "month"),
    ("joules_per_day", "joules", "joules today", "day"),
)


def window_headers(
    limits: Limits, requests: tuple[int, int], tokens: tuple[int, int]
) -> dict[str, str]:
    """OpenAI's x-ratelimit-* from each window's (amount in the last 60 s, ns until empty)."""
    out: dict[str, str] = {}
    for name, limit, (total, reset_ns) in (
        ("requests", limits.requests_per_minute, requests),
        ("tokens", limits.tokens_per_minute, tokens),
    ):
        if limit is None:
            continue
        out[f"x-ratelimit-limit-{name}"] = str(limit)
        out[f"x-ratelimit-remaining-{name}"] = str(max(limit - total, 0))
        out[f"x-ratelimit-reset-{name}"] = duration(reset_ns)
    return out


def rate_limited(
    limit_name: str, wait_ns: int, message: str, headers: dict[str, str]
) -> RateLimited:
    return RateLimited(
        message, limit=limit_name, retry_after_s=max(1, math.ceil(wait_ns / 1e9)), headers=headers
    )


def concurrency_message(tenant: str, in_flight: int, limit: int) -> str:
    return (
        f"tenant `{tenant}` has {in_flight} of {limit} concurrent requests in flight; "
        "retry when one finishes"
    )


def requests_message(tenant: str, total: int, limit: int, wait_ns: int) -> str:
    return (
        f"tenant `{tenant}` has made {total:,} of {limit:,} requests in the last minute; "
        f"retry in {duration(wait_ns)}"
    )


def tokens_message(tenant: str, total: int, limit: int, estimate: int, wait_ns: int) -> str:
    return (
        f"tenant `{tenant}` has used {total:,} of {limit:,} tokens in the last minute and "
        f"this request may use {estimate:,}; retry in {duration(wait_ns)}"
    )


def budget_fits(limit: float | None, used: float, need: int) -> bool:
    return limit is None or (used + need <= limit and used < limit)


def budget_refusal(
    tenant: str,
    limit_name: str,
    limit: float,
    used: float,
    need: int,
    unit: str,
    resets: datetime,
    now_s: float,
) -> QuotaExhausted:
    wait_s = resets.timestamp() - now_s
    what = f"{used:,.0f}" if unit != "USD this month" else f"{used:,.2f}"
    cap = f"{limit:,.0f}" if unit != "USD this month" else f"{limit:,.2f}"
    extra = f" and this request may use {need:,} more" if need and used < limit else ""
    return QuotaExhausted(
        f"tenant `{tenant}` has used {what} of {cap} {unit}{extra}; resets at "
        f"{resets.strftime('%Y-%m-%d %H:%M')} {resets.tzname()}",
        limit=limit_name,
        retry_after_s=math.ceil(wait_s),
        headers={},
    )


def calendar(zone: ZoneInfo, now_s: float) -> Periods:
    """(day, month, start of the next day, start of the next month) in the quota time zone."""
    local = datetime.fromtimestamp(now_s, zone)
    day_start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = (day_start + timedelta(days=1, hours=3)).replace(hour=0)
    month_start = day_start.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return local.strftime("%Y-%m-%d"), local.strftime("%Y-%m"), next_day, next_month


# The limits a usage ratio is exported for (`Quota.ratios`); max_tokens_per_request is per request.
RATIO_LIMITS = (
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "usd_per_month",
    "joules_per_day",
    "max_concurrent",
)


class Quota:
    def __init__(self, timezone: str) -> None:
        self.zone = ZoneInfo(timezone)
        self.states: dict[str, TenantState] = {}
        self.dirty: set[tuple[str, str, str]] = set()  # (tenant, kind, period) to persist
        # The periods of the current local day, and the Unix seconds it spans: every request
        # asks (admission, settlement, the usage gauges), and the calendar arithmetic in a
        # time zone costs more than the rest of admission together.
        self._today: tuple[float, float, Periods] | None = None

    def set_timezone(self, timezone: str) -> None:
        self.zone = ZoneInfo(timezone)
        self._today = None

    def state(self, tenant: str) -> TenantState:
        found = self.states.get(tenant)
        if found is None:
            found = self.states[tenant] = TenantState()
        return found

    def periods(self, now_s: float) -> Periods:
        today = self._today
        if today is not None and today[0] <= now_s < today[1]:
            return today[2]
        found = calendar(self.zone, now_s)
        local = datetime.fromtimestamp(now_s, self.zone)
        start_s = local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        end_s = found[2].timestamp()
        if start_s <= now_s < end_s:  # else a day that begins oddly (DST): not kept
            self._today = (start_s, end_s, found)
        return found

    def used(self, tenant: str, kind: str, period: str) -> float:
        return self.state(tenant).spend.get((kind, period), 0.0)

    def headers(self, tenant: Tenant, now_ns: int) -> dict[str, str]:
        limits, state = tenant.limits, self.state(tenant.name)

        def window(limit: int | None, log: SlidingLog) -> tuple[int, int]:
            if limit is None:
                return 0, 0
            log.expire(now_ns)
            return log.total, log.wait_ns(now_ns, limit, limit) if log.total else 0

        return window_headers(
            limits,
            window(limits.requests_per_minute, state.requests),
            window(limits.tokens_per_minute, state.tokens),
        )

    def admit(
        self, tenant: Tenant, estimate: int, now_ns: int, now_s: float, *, capped: bool = True
    ) -> Ticket:
        """Reserve one request and `estimate` tokens, or raise RateLimited / QuotaExhausted.
        `capped`: the estimate is a bound the request cannot exceed (an output cap was set)."""
        fits = estimate if capped else 0  # what must fit beside what is used and reserved
        limits, state, name = tenant.limits, self.state(tenant.name), tenant.name
        day, month, next_day, next_month = self.periods(now_s)
        if limits.max_concurrent is not None and state.concurrent >= limits.max_concurrent:
            raise self._limited(
                tenant,
                "max_concurrent",
                1_000_000_000,
                now_ns,
                concurrency_message(name, state.concurrent, limits.max_concurrent),
            )
        if limits.requests_per_minute is not None:
            state.requests.expire(now_ns)
            if state.requests.total + 1 > limits.requests_per_minute:
                wait = state.requests.wait_ns(now_ns, 1, limits.requests_per_minute)
                raise self._limited(
                    tenant,
                    "requests_per_minute",
                    wait,
                    now_ns,
                    requests_message(name, state.requests.total, limits.requests_per_minute, wait),
                )
        if limits.tokens_per_minute is not None:
            state.tokens.expire(now_ns)
            if state.tokens.total + max(fits, 1) > limits.tokens_per_minute:
                wait = state.tokens.wait_ns(now_ns, max(fits, 1), limits.tokens_per_minute)
                raise self._limited(
                    tenant,
                    "tokens_per_minute",
                    wait,
                    now_ns,
                    tokens_message(
                        name, state.tokens.total, limits.tokens_per_minute, estimate, wait
                    ),
                )
        self._budget(
            tenant,
            "tokens_per_day",
            limits.tokens_per_day,
            self.used(name, "tokens", day) + state.reserved_today,
            fits,
            "tokens today",
            next_day,
            now_s,
        )
        self._budget(
            tenant,
            "usd_per_month",
            limits.usd_per_month,
            self.used(name, "usd", month),
            0,
            "USD this month",
            next_month,
            now_s,
        )
        self._budget(
            tenant,
            "joules_per_day",
            limits.joules_per_day,
            self.used(name, "joules", day),
            0,
            "joules today",
            next_day,
            now_s,
        )
        state.concurrent += 1
        state.reserved_today += estimate
        request_entry = (
            state.requests.add(now_ns, 1) if limits.requests_per_minute is not None else None
        )
        token_entry = (
            state.tokens.add(now_ns, estimate) if limits.tokens_per_minute is not None else None
        )
        return Ticket(name, estimate, request_entry, token_entry, day)

    def _budget(
        self,
        tenant: Tenant,
        limit_name: str,
        limit: float | None,
        used: float,
        need: int,
        unit: str,
        resets: datetime,
        now_s: float,
    ) -> None:
        if limit is None or budget_fits(limit, used, need):
            return
        raise budget_refusal(tenant.name, limit_name, limit, used, need, unit, resets, now_s)

    def _limited(
        self, tenant: Tenant, limit_name: str, wait_ns: int, now_ns: int, message: str
    ) -> RateLimited:
        return rate_limited(limit_name, wait_ns, message, self.headers(tenant, now_ns))

    def settle(
        self, ticket: Ticket, tokens: int, usd: float, joules: float, now_ns: int, now_s: float
    ) -> None:
        """Replace the reservation by real usage; release the concurrency slot. Once per
        ticket: a repeated settlement changes nothing."""
        if ticket.settled:
            return
        ticket.settled = True
        state = self.state(ticket.tenant)
        state.concurrent -= 1
        state.reserved_today -= ticket.reserved
        if ticket.token_entry is not None:
            state.tokens.adjust(ticket.token_entry, ticket.reserved, tokens, now_ns)
        self.charge(ticket.tenant, ticket.day, tokens, usd, joules, now_s)

    def release(self, ticket: Ticket) -> None:
        """The request's process died before it settled: free its concurrency slot and its
        reservation of today's tokens (its per-minute entries stay: it may have run)."""
        state = self.state(ticket.tenant)
        state.concurrent -= 1
        state.reserved_today -= ticket.reserved

    def charge(
        self, tenant: str, day_of_tokens: str, tokens: int, usd: float, joules: float, now_s: float
    ) -> None:
        """Add settled spend to the day and month budgets (tokens to the day of admission)."""
        state = self.state(tenant)
        day, month, _, _ = self.periods(now_s)
        for kind, period, amount in (
            ("tokens", day_of_tokens, tokens),
            ("usd", month, usd),
            ("joules", day, joules),
        ):
            if amount:
                key = (kind, period)
                state.spend[key] = state.spend.get(key, 0.0) + amount
                self.dirty.add((tenant, kind, period))

    def ratios(self, tenant: Tenant, now_ns: int, now_s: float) -> dict[str, float]:
        """used / limit for every limit the tenant has (for the usage-ratio gauge)."""
        limits, state, name = tenant.limits, self.state(tenant.name), tenant.name
        day, month, _, _ = self.periods(now_s)
        state.requests.expire(now_ns)
        state.tokens.expire(now_ns)
        pairs: list[tuple[str, float, float | int | None]] = [
            ("requests_per_minute", state.requests.total, limits.requests_per_minute),
            ("tokens_per_minute", state.tokens.total, limits.tokens_per_minute),
            ("tokens_per_day", self.used(name, "tokens", day), limits.tokens_per_day),
            ("usd_per_month", self.used(name, "usd", month), limits.usd_per_month),
            ("joules_per_day", self.used(name, "joules", day), limits.joules_per_day),
            ("max_concurrent", state.concurrent, limits.max_concurrent),
        ]
        return {key: used / limit for key, used, limit in pairs if limit}
