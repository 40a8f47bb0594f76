"""The value meter: the hooks the request path calls (opener, duplicate completer, sink), the
sweep that closes tasks into the `meterproxy_task_*` counters, and feedback resolved to a task.

Outcomes and tasks are keyed by tenant + task id, so a tenant can only ever name its own; a
request named by its key must be that tenant's (else 403). Feedback for a task whose requests
are still in flight is kept on the open task and counted when it closes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import errors
from ..exchange import Exchange, Outcome
from ..metrics import Metrics
from ..settlement import Settlement
from ..store.base import StoreUnavailable
from .duplicates import RepeatWindow, digest, salt_key
from .feedback import Feedback
from .settings import ValueSettings
from .store import OutcomeRow, RequestRow, ValueStore
from .tasks import Figures, Report, Settled, TaskBook, TaskKey

log = logging.getLogger(__name__)
T = TypeVar("T")

Spawn = Callable[[str, Coroutine[Any, Any, None]], object]
# Bodies up to this size are hashed on the loop (about 10 us for 1 KB, under 1 ms at this size:
# normalizing costs ~18 us per KiB); larger ones in a worker thread, like large token estimates.
INLINE_HASH_BYTES = 32 * 1024
# Tasks closed per turn of the event loop by the sweeper.
SWEEP_BATCH = 64
# How often the stored salt is asked for again while the database is unavailable.
SALT_RETRY_S = 5.0


@dataclass(frozen=True, slots=True)
class Accepted:
    feedback_id: str
    task_id: str
    report: Report
    in_flight: int  # requests of the task still running
    open: bool  # the task is open: its counters will take this report when it closes
    dryrun: bool

    def body(self) -> dict[str, object]:
        return {
            "object": "meterproxy.feedback",
            "feedback_id": self.feedback_id,  # TensorZero's response field
            "task_id": self.task_id,
            "result": self.report.result.value,
            "score": self.report.score,
            "metric": self.report.metric,
            "in_flight": self.in_flight,
            "task_state": "open" if self.open else "closed",
            "dryrun": self.dryrun,
        }


class ValueMeter:
    def __init__(
        self,
        settings: Callable[[], ValueSettings],
        metrics: Metrics,
        clock: Callable[[], int],
        wall_clock: Callable[[], float],
        *,
        store: ValueStore | None,
        spawn: Spawn,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self.store = store
        self._spawn = spawn
        current = settings()
        self.book = TaskBook(current.max_open_tasks)
        self.repeats = RepeatWindow()
        # Until the stored salt is read: the configured one, else one for this process.
        self.salt = current.salt or secrets.token_hex(32)
        self._key = salt_key(self.salt)
        self.salt_stored = store is None or current.salt is not None

    async def open(self) -> None:
        if self.store is not None:
            await self.store.open()
            await self._read_salt()

    async def keep_salt(self) -> None:
        """Background, while the database was unavailable at `open`: until the stored salt is
        read (or a new one stored). Duplicates already seen under the process's salt
        are not recognized across the switch; nothing else hashed with it is kept."""
        while not self.salt_stored:
            await asyncio.sleep(SALT_RETRY_S)
            await self._read_salt()

    async def _read_salt(self) -> None:
        assert self.store is not None
        try:
            salt = await self.store.salt(self._settings().salt)
        except StoreUnavailable as exc:
            log.warning("value: the salt cannot be read yet (%s); retried", exc)
            return
        self.salt, self._key, self.salt_stored = salt, salt_key(salt), True

    def _now_s(self) -> float:
        return self._clock() / 1e9

    # -- the request path's hooks ---------------------------------------------------------

    def opened(self, ex: Exchange) -> None:
        """Opener: the exchange's tenant is known; its task is in flight."""
        self.book.opened(ex.key, ex.tenant.name, ex.task_id, self._now_s())

    def completer(self, ex: Exchange, done: Callable[[], None]) -> bool:
        """Settlement completer: is this request a repeat? Large bodies are hashed off-loop."""
        window_ns = int(self._settings().duplicate_window_s * 1e9)
        if not window_ns or not ex.reached_upstream or ex.body is None or not ex.endpoint.metered:
            return False
        if ex.body_bytes <= INLINE_HASH_BYTES:
            self._judge(ex, digest(self._key, ex.endpoint.name, ex.model, ex.body), window_ns)
            return False
        self._spawn(f"duplicate:{ex.key}", self._off_loop(ex, window_ns, done))
        return True

    async def _off_loop(self, ex: Exchange, window_ns: int, done: Callable[[], None]) -> None:
        try:
            assert ex.body is not None
            key = await asyncio.get_running_loop().run_in_executor(
                None, digest, self._key, ex.endpoint.name, ex.model, ex.body
            )
            self._judge(ex, key, window_ns)
        finally:
            done()

    def _judge(self, ex: Exchange, key: bytes, window_ns: int) -> None:
        tenant = ex.tenant.name
        if self.repeats.repeats(tenant, key, ex.started_ns, window_ns):
            ex.repeated()
        if ex.outcome is Outcome.SUCCESS:  # an answer was received whole
            self.repeats.answered(tenant, key, ex.started_ns, window_ns)

    def settled(self, s: Settlement) -> None:
        """Settlement sink: the request joins its task's figures; rows queue for the store."""
        key = s.request_id
        # Only a request of a named task, or a repeat, is stored: its task is looked up then.
        task = self.book.request(key) if s.task_id is not None or s.duplicate else None
        usage = s.usage
        late = self.book.settled(
            Settled(  # key, tenant, model, reached_upstream, cost_usd, energy_j, tokens
                key,
                s.tenant,
                s.model,
                s.reached_upstream,
                s.cost_usd,
                s.energy_j or 0.0,
                (usage.prompt or 0) + (usage.completion or 0),
            ),
            self._clock() / 1e9,
        )
        if late is not None:
            self._count([late])
        if task is None:
            return  # not stored, or refused before its tenant was known: nobody's task
        if s.duplicate:
            self._metrics.child(self._metrics.duplicates, s.tenant, s.model).inc()
        if self.store is not None:
            self.store.add(RequestRow(key, s.tenant, task[1], s.ts, s.duplicate))

    # -- closing tasks --------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._settings().outcome_grace_s / 4))
            # Thousands of tasks may be due at once (a second of traffic at thousands of
            # requests a second): closed a batch per turn of the loop, never in one stall.
            while True:
                if not self.sweep(SWEEP_BATCH):
                    break
                await asyncio.sleep(0)

    def sweep(self, limit: int | None = None) -> bool:
        """Close the tasks due (at most `limit`) into the counters; whether more may be due."""
        current = self._settings()
        due, more = self.book.close_due(
            self._now_s(), current.task_idle_s, current.outcome_grace_s, limit
        )
        if due:
            self._count(due)
        return more

    def _count(self, figures: list[Figures]) -> None:
        """Into the counters, summed per series first: a sweep closes thousands of tasks a
        second, mostly under a handful of (tenant, model, result) series."""
        sums: dict[tuple[str, str, str], list[float]] = {}
        for f in figures:
            labels = (f.tenant, f.model, f.result.value)
            acc = sums.get(labels)
            if acc is None:
                sums[labels] = [float(f.closes), f.cost_usd, f.energy_j, float(f.tokens)]
            else:
                acc[0] += f.closes
                acc[1] += f.cost_usd
                acc[2] += f.energy_j
                acc[3] += f.tokens
        m = self._metrics
        for labels, (tasks, cost_usd, energy_j, tokens) in sums.items():
            if tasks:
                m.child(m.task_outcomes, *labels).inc(tasks)
            m.child(m.task_cost, *labels).inc(cost_usd)
            m.child(m.task_energy, *labels).inc(energy_j)
            m.child(m.task_tokens, *labels).inc(tokens)

    # -- feedback -------------------------------------------------------------------------

    async def report(self, tenant: str, feedback: Feedback) -> Accepted:
        task_key = await self._resolve(tenant, feedback)
        report = feedback.report
        is_open = self.book.is_open(task_key)
        feedback_id = str(uuid.uuid4())
        if not feedback.dryrun:
            is_open = self.book.report(task_key, report, self._now_s())
            if self.store is not None:
                self.store.add(
                    OutcomeRow(
                        tenant,
                        task_key[1],
                        report.success,
                        report.score,
                        report.metric,
                        self._wall_clock(),
                        feedback_id,
                    )
                )
            self._metrics.feedback.labels(tenant, report.result.value).inc()
        return Accepted(
            feedback_id,
            task_key[1],
            report,
            self.book.in_flight(task_key),
            is_open,
            feedback.dryrun,
        )

    @staticmethod
    async def _stored(read: Awaitable[T]) -> T:
        try:
            return await read
        except StoreUnavailable as exc:
            log.error("value: feedback cannot be resolved from the ledger's database (%s)", exc)
            raise errors.LedgerUnavailable(
                "the task is no longer in memory and the ledger's database cannot be read right "
                "now; send the report again in a few seconds"
            ) from None

    async def _resolve(self, tenant: str, feedback: Feedback) -> TaskKey:
        if feedback.request_id is not None:
            key = feedback.request_id
            found = self.book.request(key)
            if found is None and self.store is not None:
                found = await self._stored(self.store.find_request(key))
            if found is None:
                raise errors.RequestNotFound(
                    f"no request `{key}` is known here; name a request by the "
                    "x-meterproxy-request-id header of its response",
                    param=feedback.param,
                )
            if found[0] != tenant:
                raise errors.NotYourTask(
                    f"request `{key}` was sent with another tenant's key; a tenant reports only "
                    "on its own requests",
                    param=feedback.param,
                )
            return found
        assert feedback.task_id is not None
        task_id = feedback.task_id
        if self.book.knows((tenant, task_id)):
            return tenant, task_id
        owners = self.book.tenants(task_id)
        alone = self.book.request(task_id)  # a request sent alone is its own task
        if alone is not None and alone[1] == task_id:
            owners.add(alone[0])
        if not owners and self.store is not None:
            owners = await self._stored(self.store.task_tenants(task_id))
        if tenant in owners:
            return tenant, task_id
        if owners:
            raise errors.NotYourTask(
                f"task `{task_id}` belongs to another tenant; a tenant reports only on its own "
                "tasks",
                param=feedback.param,
            )
        raise errors.TaskNotFound(
            f"no task `{task_id}` is known for this key; send its requests with the header "
            "x-meterproxy-task first (or name a request by its x-meterproxy-request-id)",
            param=feedback.param,
        )
