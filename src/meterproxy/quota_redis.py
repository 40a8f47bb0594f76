"""The Redis quota backend: every replica admits against one shared state, one Lua script per
admission (quota_lua.py), on Redis's clock; refusals worded and headed exactly like the
in-process backend's (quota.py).

Reservations are keyed by the proxy's request key and held for `quota.reservation_ttl_s`;
each replica refreshes its own every third of that, so a replica that dies frees them within
one TTL. Settlement is a sink: queued, then applied by a background task, once per key
(a retried batch is harmless), overage included.

Redis is a cache; the ledger is the truth. Spend is held per ledger; when Redis no longer holds
a ledger's spend (restarted without persistence, flushed), the first replica that notices
rebuilds it from that ledger, adding what was settled meanwhile. A periodic check exports the
difference between Redis and the ledger. When Redis is down or slower than `quota.timeout_s`,
a tenant is refused (503) or admitted uncounted, per `quota.on_backend_error`; the client
reconnects by itself when Redis returns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from . import quota_lua
from .errors import QuotaUnavailable
from .ledger_spend import LedgerReadError, LedgerSpend, Span, Spend
from .policy import Limits, Tenancy, Tenant
from .quota import (
    BUDGETS,
    Ticket,
    budget_refusal,
    concurrency_message,
    rate_limited,
    requests_message,
    tokens_message,
    window_headers,
)
from .quota_settings import QuotaBackendSettings

if TYPE_CHECKING:
    from .metrics import Metrics
    from .settlement import Settlement

log = logging.getLogger(__name__)

# What counts as the store failing (a script error is a RedisError too: logged in full); a
# ledger that cannot be read fails a rebuild or a check the same way: retried, never lost.
FAILURES = (RedisError, OSError, asyncio.TimeoutError, LedgerReadError)
BATCH = 256  # settlements per pipeline
MAX_QUEUE = 200_000  # settlements waiting while Redis is down; older ones are dropped
REBUILD_GRACE_S = 0.3  # lets ledger writers commit rows settled just before the loss
RETRY_S = 0.5
UNITS = {limit: unit for limit, _, unit, _ in BUDGETS}


@dataclass(frozen=True)
class Periods:
    """Three consecutive days (or months) around the caller's clock and their four bounds."""

    names: tuple[str, str, str]
    bounds: tuple[datetime, datetime, datetime, datetime]

    def span(self) -> Span:
        return Span(self.bounds[1].timestamp(), self.bounds[2].timestamp())


def calendar_arg(days: Periods, months: Periods) -> str:
    """The scripts' `calendar`: day bounds, month bounds, day names, month names."""
    bounds = [repr(b.timestamp()) for b in (*days.bounds, *months.bounds)]
    return ",".join([*bounds, *days.names, *months.names])


def calendar(zone: ZoneInfo, now_s: float) -> tuple[Periods, Periods]:
    today = datetime.fromtimestamp(now_s, zone).date()
    days = [today + timedelta(days=i) for i in (-1, 0, 1, 2)]
    first = today.replace(day=1)
    months = [_add_months(first, i) for i in (-1, 0, 1, 2)]

    def periods(starts: list[date], fmt: str) -> Periods:
        bounds = tuple(datetime.combine(d, time(), zone) for d in starts)
        names = tuple(d.strftime(fmt) for d in starts[:3])
        return Periods(names, bounds)  # type: ignore[arg-type]

    return periods(days, "%Y-%m-%d"), periods(months, "%Y-%m")


def _add_months(first: date, months: int) -> date:
    index = first.year * 12 + first.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


class _Keys:
    """The Redis keys of one tenant (one hash tag, so one cluster slot)."""

    __slots__ = ("base", "ledgers", "live")

    def __init__(self, prefix: str, tenant: str) -> None:
        self.base = base = f"{prefix}:{{{tenant}}}:"
        self.live, self.ledgers = base + "live", base + "ledgers"

    def day(self, name: str) -> str:
        return self.base + "d:" + name

    def month(self, name: str) -> str:
        return self.base + "m:" + name


class RedisQuota:
    def __init__(
        self,
        settings: QuotaBackendSettings,
        tenancy: Tenancy,
        metrics: Metrics,
        ledger: LedgerSpend | None,
        wall_clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self._tenancy = tenancy
        self._zone = ZoneInfo(tenancy.timezone)
        self._metrics = metrics
        self._ledger = ledger
        self._ledger_id = ledger.identity if ledger is not None else "none"
        self._wall_clock = wall_clock
        self._ttl_us = int(settings.reservation_ttl_s * 1e6)
        self._done_ttl_s = max(600, int(settings.reservation_ttl_s * 10))
        self._keys: dict[str, _Keys] = {}
        self._calendar: tuple[float, float, Periods, Periods, str] | None = None
        self._limits: dict[Limits, str] = {}
        self.inflight: dict[str, tuple[str, int]] = {}  # request key -> (tenant, reserved)
        self._queue: collections.deque[Settlement] = collections.deque()
        self._applying = 0
        self._batch: list[tuple[str, list[str], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._rebuilding: dict[str, asyncio.Lock] = {}
        self.up = True
        self._reset_idle: asyncio.Task[None] | None = None
        self._up = metrics.quota_backend_up.labels("redis")
        self._up.set(1)
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.timeout_s,
            retry=Retry(NoBackoff(), 0),  # a retry would multiply the timeout: fail, and count
            health_check_interval=0,
        )
        self._admit = self._client.register_script(quota_lua.ADMIT)
        self._settle = self._client.register_script(quota_lua.SETTLE)
        self._rebuild_script = self._client.register_script(quota_lua.REBUILD)
        self._keepalive = self._client.register_script(quota_lua.KEEPALIVE)

    # -- QuotaBackend ---------------------------------------------------------------------

    def reconfigure(self, tenancy: Tenancy) -> None:
        self._tenancy = tenancy
        self._zone = ZoneInfo(tenancy.timezone)
        self._calendar = None

    async def admit(self, tenant: Tenant, estimate: int, key: str, *, capped: bool) -> Ticket:
        days, months, calendar_text = self._periods(self._wall_clock())
        keys = [self._keys_of(tenant.name).live]
        args = [
            self._ledger_id,
            key,
            str(estimate),
            "1" if capped else "0",
            self._limits_arg(tenant.limits),
            str(self._ttl_us),
            calendar_text,
        ]
        for attempt in (1, 2):
            try:
                reply = await self._admit_one(keys[0], args)
                if reply[0] == b"rebuild" and attempt == 1:
                    await self._rebuild(tenant.name)
                    continue
            except FAILURES as exc:
                self._failed("admit", exc)
                return self._unavailable(tenant, exc, days.names[1])
            self._ok()
            if reply[0] == b"ok":
                if reply[3] == b"1":  # a reservation: kept alive while the request runs
                    self.inflight[key] = (tenant.name, estimate)
                return Ticket(tenant.name, estimate, None, None, days.names[int(reply[1]) - 1])
            if reply[0] == b"limited":
                raise self._limited(tenant, estimate, reply)
            if reply[0] == b"exhausted":
                raise self._exhausted(tenant, reply, days, months)
            break
        error = RedisError(f"unexpected reply {reply[0]!r} from the admission script")
        self._failed("admit", error)
        return self._unavailable(tenant, error, days.names[1])

    async def _admit_one(self, key: str, args: list[str]) -> list[bytes]:
        """Admissions that arrive in the same loop iteration share one round trip (each
        script still runs atomically on its own)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[bytes]] = loop.create_future()
        self._batch.append((key, args, future))
        if len(self._batch) == 1:
            loop.call_soon(self._send_admissions)
        return await future

    def _send_admissions(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._admissions(batch))
        self._sending.add(task)  # kept until done: a task must never be lost
        task.add_done_callback(self._sending.discard)

    async def _admissions(self, batch: list[tuple[str, list[str], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._pipeline(self._admit.sha, [(k, a) for k, a, _ in batch])
        except FAILURES as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if not future.done():  # (its request may have been cancelled meanwhile)
                future.set_result(reply)

    def _limits_arg(self, limits: Limits) -> str:
        found = self._limits.get(limits)
        if found is None:
            values = (
                limits.requests_per_minute,
                limits.tokens_per_minute,
                limits.tokens_per_day,
                limits.usd_per_month,
                limits.joules_per_day,
                limits.max_concurrent,
            )
            found = self._limits[limits] = ",".join(repr(v or 0) for v in values)
        return found

    def settle(self, settlement: Settlement) -> None:
        """Settlement sink: queued for the drain task; never blocks."""
        if settlement.ticket is None:
            return
        self.inflight.pop(settlement.request_id, None)
        if len(self._queue) >= MAX_QUEUE:
            self._queue.popleft()
            self._metrics.quota_backend_errors.labels("redis", "dropped").inc()
        self._queue.append(settlement)
        self._wake.set()

    async def open(self) -> None:
        try:
            await self._load_scripts()
        except FAILURES as exc:
            self._failed("connect", exc)
        else:
            log.info(
                "quota: Redis at %s (ledger %s)", self.settings.redis_location, self._ledger_id
            )

    async def _load_scripts(self) -> None:
        """Pipelines run scripts by digest only: load them (again, after a Redis restart)."""
        for script in (self._admit, self._settle, self._rebuild_script, self._keepalive):
            script.sha = await self._client.script_load(script.script)

    async def run(self) -> None:
        await asyncio.gather(self._drain(), self._refresh(), self._check_drift())

    async def close(self) -> None:
        """Apply what is queued (for a few seconds at most), then disconnect."""
        for _ in range(10):
            if not self._queue or not await self._apply_batch():
                break
        if self._queue:
            log.error(
                "quota: %d settlements not applied to Redis at shutdown (the ledger has them)",
                len(self._queue),
            )
        await asyncio.gather(*self._sending, return_exceptions=True)
        await self._client.aclose()

    # -- admission replies ----------------------------------------------------------------

    def _limited(self, tenant: Tenant, estimate: int, reply: list[bytes]) -> Exception:
        limit = reply[1].decode()
        wait_ns, used = int(reply[2]) * 1000, int(reply[3])
        requests, requests_reset_ns = int(reply[4]), int(reply[5]) * 1000
        tokens, tokens_reset_ns = int(reply[6]), int(reply[7]) * 1000
        limits, name = tenant.limits, tenant.name
        if limit == "max_concurrent":
            assert limits.max_concurrent is not None
            message = concurrency_message(name, used, limits.max_concurrent)
        elif limit == "requests_per_minute":
            assert limits.requests_per_minute is not None
            message = requests_message(name, used, limits.requests_per_minute, wait_ns)
        else:
            assert limits.tokens_per_minute is not None
            message = tokens_message(name, used, limits.tokens_per_minute, estimate, wait_ns)
        headers = window_headers(limits, (requests, requests_reset_ns), (tokens, tokens_reset_ns))
        return rate_limited(limit, wait_ns, message, headers)

    def _exhausted(
        self, tenant: Tenant, reply: list[bytes], days: Periods, months: Periods
    ) -> Exception:
        limit_name = reply[1].decode()
        used, need, index, now_us = float(reply[2]), int(reply[3]), int(reply[4]), int(reply[5])
        periods = months if limit_name == "usd_per_month" else days
        limit = getattr(tenant.limits, limit_name)
        resets = periods.bounds[index]  # the start of the period after the one that holds now
        return budget_refusal(
            tenant.name, limit_name, limit, used, need, UNITS[limit_name], resets, now_us / 1e6
        )

    def _unavailable(self, tenant: Tenant, exc: BaseException, day: str) -> Ticket:
        if self.settings.fails_closed(tenant.limits):
            if isinstance(exc, (RedisTimeout, asyncio.TimeoutError)):
                what = f"did not answer within {self.settings.timeout_s:g} s (quota.timeout_s)"
            else:
                what = "cannot be reached"
            raise QuotaUnavailable(
                f"the quota store (Redis at {self.settings.redis_location}) {what}, so the "
                f"limits of tenant `{tenant.name}` cannot be checked and they fail closed "
                "(quota.on_backend_error); retry shortly"
            )
        self._metrics.quota_unchecked.labels(tenant.name).inc()
        return Ticket(tenant.name, 0, None, None, day)  # nothing reserved; usage still charged

    # -- settlement -----------------------------------------------------------------------

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                if not await self._apply_batch():
                    await asyncio.sleep(RETRY_S)

    @property
    def unapplied(self) -> int:
        """Settlements not yet applied to Redis (queued, or in a batch on its way)."""
        return len(self._queue) + self._applying

    async def _apply_batch(self) -> bool:
        batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
        self._applying = len(batch)
        try:
            return await self._apply(batch)
        finally:
            self._applying = 0

    async def _apply(self, batch: list[Settlement]) -> bool:
        _, _, calendar_text = self._periods(self._wall_clock())
        answers: dict[str, tuple[str, str]] = {}  # request key -> (the ledger's answer, watermark)
        try:
            for _ in range(3):  # a check, then the settlement with the ledger's answer
                replies = await self._pipeline(
                    self._settle.sha,
                    [self._settle_call(s, calendar_text, answers.get(s.request_id)) for s in batch],
                )
                checks: dict[str, list[str]] = collections.defaultdict(list)
                later = []
                for s, reply in zip(batch, replies, strict=True):
                    if reply[0] == b"ok":
                        self._ratios(s.tenant, reply)
                    elif reply[0] == b"check":
                        checks[reply[1].decode()].append(s.request_id)
                        later.append(s)
                if not later:
                    break
                await self._ask_ledger(checks, answers)
                batch = later
            else:  # rebuilt again meanwhile: their turn comes again
                self._queue.extendleft(reversed(batch))
        except FAILURES as exc:
            self._queue.extendleft(reversed(batch))  # applied once all the same: keyed markers
            self._failed("settle", exc)
            return False
        self._ok()
        return True

    async def _pipeline(self, sha: str, calls: list[tuple[str, list[str]]]) -> list[Any]:
        """One round trip for many script calls (each still atomic on its own)."""
        if len(calls) == 1:  # (a pipeline object costs more than the call itself)
            key, args = calls[0]
            try:
                return [await self._client.evalsha(sha, 1, key, *args)]
            except NoScriptError:
                await self._load_scripts()
                return [await self._client.evalsha(sha, 1, key, *args)]
        for attempt in (1, 2):
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, args in calls:
                        pipe.evalsha(sha, 1, key, *args)
                    return list(await pipe.execute())
            except NoScriptError:  # Redis restarted: load the scripts, once
                if attempt == 2:
                    raise
                await self._load_scripts()  # (the same text: the same digest)
        raise AssertionError("unreachable")

    async def _ask_ledger(
        self, checks: dict[str, list[str]], answers: dict[str, tuple[str, str]]
    ) -> None:
        """Settlements from around a rebuild: was each one's row in the rebuilt sum?"""
        loop = asyncio.get_running_loop()
        for watermark, keys in checks.items():
            seen: set[str] = set()
            if self._ledger is not None:
                seen = await loop.run_in_executor(None, self._ledger.counted, keys, watermark)
            for key in keys:
                answers[key] = ("counted" if key in seen else "charge", watermark)

    def _settle_call(
        self, s: Settlement, calendar_text: str, answer: tuple[str, str] | None
    ) -> tuple[str, list[str]]:
        ticket = s.ticket
        assert ticket is not None
        usage = s.usage
        tokens = (usage.prompt or 0) + (usage.completion or 0)
        tenant = self._tenancy.tenant(ticket.tenant)
        args = [
            self._ledger_id,
            s.request_id,
            str(ticket.reserved),
            str(tokens),
            repr(float(s.cost_usd)),
            repr(float(s.energy_j or 0.0)),
            "1" if tenant.limits.tokens_per_minute is not None else "0",
            str(self._done_ttl_s),
            calendar_text,
            ticket.day,
            repr(s.ts),
            *(answer or ("", "")),
        ]
        return self._keys_of(ticket.tenant).live, args

    def _ratios(self, name: str, reply: list[bytes]) -> None:
        limits = self._tenancy.tenant(name).limits
        used = {
            "requests_per_minute": int(reply[1]),
            "tokens_per_minute": int(reply[2]),
            "max_concurrent": int(reply[3]),
            "tokens_per_day": float(reply[4]),
            "usd_per_month": float(reply[5]),
            "joules_per_day": float(reply[6]),
        }
        gauge = self._metrics.quota_usage_ratio
        for limit, value in used.items():
            cap = getattr(limits, limit)
            if cap:
                gauge.labels(name, limit).set(value / cap)

    # -- reservations kept alive; lost state noticed --------------------------------------

    async def _refresh(self) -> None:
        every_s = self.settings.reservation_ttl_s / 3
        while True:
            await asyncio.sleep(every_s if self.up else min(every_s, 1.0))
            await self.refresh()

    async def refresh(self) -> None:
        """Extend this replica's reservations (restoring any the store lost) and rebuild the
        spend of every tenant with limits whose ledger spend the store no longer holds."""
        mine: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
        for key, (tenant, reserved) in list(self.inflight.items()):
            mine[tenant].append((key, reserved))
        tenants = sorted(set(mine) | set(self._limited_tenants()))
        if not tenants:
            return
        calls = []
        for name in tenants:
            args = [self._ledger_id, str(self._ttl_us)]
            args += [v for key, reserved in mine.get(name, []) for v in (key, str(reserved))]
            calls.append((self._keys_of(name).live, args))
        try:
            replies = await self._pipeline(self._keepalive.sha, calls)
        except FAILURES as exc:
            self._failed("refresh", exc)
            return
        self._ok()
        for name, (held, restored) in zip(tenants, replies, strict=True):
            if restored:
                log.warning("quota: restored %d reservations of tenant %s", restored, name)
            if not held and name in self._tenancy.tenants:
                await self._rebuild_quietly(name)

    def _limited_tenants(self) -> list[str]:
        return [name for name, t in self._tenancy.tenants.items() if t.limits != Limits()]

    async def _rebuild_quietly(self, tenant: str) -> None:
        try:
            await self._rebuild(tenant)
        except FAILURES as exc:
            self._failed("rebuild", exc)

    async def _rebuild(self, tenant: str) -> None:
        """Rebuild this ledger's day and month spend of `tenant` from the ledger, plus what was
        settled while it was missing (kept aside by the settle script, and left out of the
        ledger's sums so that nothing counts twice)."""
        lock = self._rebuilding.setdefault(tenant, asyncio.Lock())
        async with lock:
            k = self._keys_of(tenant)
            if await self._client.hexists(k.ledgers, self._ledger_id):
                return  # rebuilt meanwhile, by this replica or another
            await asyncio.sleep(REBUILD_GRACE_S)
            pending_key = k.base + "pending:" + self._ledger_id
            days, months, _ = self._periods(self._wall_clock())
            loop = asyncio.get_running_loop()
            for _ in range(10):
                raw = await self._client.hkeys(pending_key)
                pending = [x if isinstance(x, str) else x.decode() for x in raw]
                read_at = self._wall_clock()
                spend, watermark = Spend(), "0"
                if self._ledger is not None:
                    spend, watermark = await loop.run_in_executor(
                        None, self._ledger.spend, tenant, days.span(), months.span(), pending
                    )
                reply = await self._rebuild_script(
                    keys=[k.live],
                    args=[
                        self._ledger_id,
                        str(len(pending)),
                        repr(spend.tokens),
                        repr(spend.usd),
                        repr(spend.joules),
                        days.names[1],
                        months.names[1],
                        f"{read_at!r}|{watermark}",
                    ],
                )
                if reply == b"ok":
                    self._metrics.quota_rebuilds.labels(tenant).inc()
                    log.warning(
                        "quota: Redis did not hold tenant %s's spend for ledger %s; rebuilt "
                        "from the ledger (%s tokens today, %.2f USD this month, %.0f J today) "
                        "plus %d requests settled meanwhile",
                        tenant,
                        self._ledger_id,
                        f"{spend.tokens:,.0f}",
                        spend.usd,
                        spend.joules,
                        len(pending),
                    )
                    return
                if reply == b"already":
                    return
            raise RedisError(f"rebuilding tenant {tenant}: settlements kept arriving")

    # -- drift: Redis against the ledger ----------------------------------------------------

    async def _check_drift(self) -> None:
        if self._ledger is None:
            return
        while True:
            await asyncio.sleep(self.settings.drift_check_s)
            try:
                await self.check_drift()
            except FAILURES as exc:
                self._failed("drift", exc)

    async def check_drift(self) -> None:
        """Export (Redis - ledger) / limit for every budget of every tenant, this ledger's part."""
        assert self._ledger is not None
        days, months, _ = self._periods(self._wall_clock())
        loop = asyncio.get_running_loop()
        for name, tenant in self._tenancy.tenants.items():
            budgets = [b for b in BUDGETS if getattr(tenant.limits, b[0]) is not None]
            if not budgets:
                continue
            k = self._keys_of(name)
            day_key, month_key = k.day(days.names[1]), k.month(months.names[1])
            L = self._ledger_id
            for _ in range(2):  # a store that lost this ledger's spend is rebuilt first
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.hexists(k.ledgers, L)
                    pipe.hmget(day_key, ["t:" + L, "j:" + L])
                    pipe.hget(month_key, "u:" + L)
                    held, (tokens, joules), usd = await pipe.execute()
                if held:
                    break
                await self._rebuild(name)
            truth, _ = await loop.run_in_executor(
                None, self._ledger.spend, name, days.span(), months.span(), ()
            )
            cached = Spend(float(tokens or 0), float(usd or 0), float(joules or 0))
            for limit, kind, _, _ in BUDGETS:
                cap = getattr(tenant.limits, limit)
                if cap is not None:
                    drift = getattr(cached, kind) - getattr(truth, kind)
                    self._metrics.quota_drift.labels(name, limit).set(drift / cap)

    # -- plumbing -------------------------------------------------------------------------

    def _keys_of(self, tenant: str) -> _Keys:
        found = self._keys.get(tenant)
        if found is None:
            found = self._keys[tenant] = _Keys(self.settings.redis_prefix, tenant)
        return found

    def _periods(self, now_s: float) -> tuple[Periods, Periods, str]:
        """The caller's calendar, recomputed only when its day changes."""
        cached = self._calendar
        if cached is not None and cached[0] <= now_s < cached[1]:
            return cached[2], cached[3], cached[4]
        days, months = calendar(self._zone, now_s)
        text = calendar_arg(days, months)
        self._calendar = (
            days.bounds[1].timestamp(),
            days.bounds[2].timestamp(),
            days,
            months,
            text,
        )
        return days, months, text

    def _failed(self, op: str, exc: BaseException) -> None:
        self._metrics.quota_backend_errors.labels("redis", op).inc()
        if self.up:
            self.up = False
            self._up.set(0)
            log.error(
                "quota: Redis at %s failed (%s: %s); tenants fail %s until it answers",
                self.settings.redis_location,
                type(exc).__name__,
                exc,
                _modes(self.settings),
            )
        if isinstance(exc, ResponseError):  # Redis answered, and refused a script: a bug
            log.error("quota: a Redis script failed: %s", exc)

    def _ok(self) -> None:
        if not self.up:
            self.up = True
            self._up.set(1)
            log.info("quota: Redis at %s is answering again", self.settings.redis_location)
            # Connections left idle in the pool from before the outage are dead: each would fail
            # one admission when next used (no retry: it could charge twice). Closed now, so
            # the next use opens a fresh one.
            self._reset_idle = asyncio.get_running_loop().create_task(
                self._client.connection_pool.disconnect(inuse_connections=False)
            )


def _modes(settings: QuotaBackendSettings) -> str:
    rate, budget = settings.on_error_rate, settings.on_error_budget
    return rate if rate == budget else f"{rate} (rate limits) / {budget} (budgets)"
