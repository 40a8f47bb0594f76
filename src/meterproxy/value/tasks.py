"""The open tasks: which requests are in flight, what each task's settled requests cost, the
last outcome reported for it, and when it closes. Pure: no I/O, times passed in.

A task is counted exactly once, when it closes: a rated task `outcome_grace_s` after its last
request or report, an unrated one (`unknown`) `task_idle_s` after its last request, never while
one of its requests is in flight. A request sent without a task id is a task of its own that no
other request can join: it closes `outcome_grace_s` after it settles, rated or not (waiting
`task_idle_s` for requests that cannot come would only hold it). A task's figures are those of
every settled request that reached an upstream (failed, retried and duplicate attempts
included). A request that settles after its task closed adds its figures under the result the
task closed with, and the task is not counted again; a report that arrives after it closed
reaches the tables, not the counters.
"""

from __future__ import annotations

import array
import collections
import enum
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

TaskKey = tuple[str, str]  # (tenant, task id)
NO_MODEL = "_none"
K = TypeVar("K")
V = TypeVar("V")  # a task none of whose requests reached an upstream


class Result(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    UNKNOWN = "unknown"  # closed with no report


@dataclass(frozen=True, slots=True)
class Report:
    success: bool
    score: float | None = None
    metric: str | None = None

    @property
    def result(self) -> Result:
        return Result.SUCCESS if self.success else Result.FAILURE


class Figures(NamedTuple):
    """What some requests of a task cost, to be counted under a result. (Named tuples here and
    in `Settled`: one is made per request, and a frozen dataclass sets each field through
    `object.__setattr__`.)"""

    tenant: str
    model: str
    result: Result
    cost_usd: float
    energy_j: float
    tokens: int
    closes: bool  # True: the task closes now (counted once); False: a late request of one


@dataclass(slots=True, eq=False)
class _Task:
    in_flight: int = 0
    reached: int = 0  # settled requests that reached an upstream
    cost_usd: float = 0.0
    energy_j: float = 0.0
    tokens: int = 0
    tokens_by_model: dict[str, int] | None = None  # made on the first settled request
    report: Report | None = None
    last_s: float = 0.0

    def model(self) -> str:
        by_model = self.tokens_by_model
        if not by_model:
            return NO_MODEL
        # Most tokens; the first model used wins a tie (dicts keep insertion order).
        return max(by_model, key=lambda m: by_model[m])


@dataclass(slots=True, eq=False)
class _Alone:
    """A request sent alone, settled, its task not yet closed: a plain record, no queues or
    maps of its own (most traffic is requests alone, thousands a second)."""

    tenant: str
    model: str  # NO_MODEL when it did not reach an upstream
    reached: bool
    cost_usd: float
    energy_j: float
    tokens: int
    report: Report | None
    last_s: float  # settled, or last reported: it closes `grace_s` after


class Settled(NamedTuple):
    key: str  # the proxy's request key (its task is what it was opened under)
    tenant: str
    model: str
    reached_upstream: bool
    cost_usd: float
    energy_j: float
    tokens: int


class TaskBook:
    def __init__(self, max_open: int, max_remembered: int | None = None) -> None:
        self._max_open = max_open
        self._max_remembered = max_remembered or 4 * max_open
        self._tasks: dict[TaskKey, _Task] = {}
        # Quiet open tasks (nothing in flight), least recently active first.
        self._unrated: collections.OrderedDict[TaskKey, None] = collections.OrderedDict()
        self._rated: collections.OrderedDict[TaskKey, None] = collections.OrderedDict()
        # Request key -> its task; a request alone (its own task, named by its key) -> its
        # tenant, a string rather than a tuple made per request.
        self._in_flight: dict[str, TaskKey | str] = {}
        self._alone_in_flight = 0
        # Requests alone, settled, not yet closed; and the order they close in: (last_s, key)
        # (an entry whose record has moved on since, by a report, is stale and skipped).
        self._alone: dict[str, _Alone] = {}
        self._alone_queue: collections.deque[tuple[float, str]] = collections.deque()
        self._early: dict[str, Report] = {}  # reports on requests alone still in flight
        # Task id -> the tenant (or, rarely, the tenants) with an open task so named. What the
        # book holds at tens of thousands of requests a second stays out of the garbage
        # collector's walk where it can: plain strings and tuples of them, no set or dict per
        # task unless needed (a full collection walks every container, with the loop stopped).
        self._tenants: dict[str, str | set[str]] = {}
        # Recently settled requests and closed tasks, for feedback and late requests.
        self._settled: collections.OrderedDict[str, TaskKey | str] = collections.OrderedDict()
        self._recent = RecentAlone(self._max_remembered)  # the same for requests alone
        self._closed: collections.OrderedDict[TaskKey, tuple[str, str]] = (
            collections.OrderedDict()
        )  # -> (result's value, model)

    @property
    def open_tasks(self) -> int:
        return len(self._tasks) + len(self._alone) + self._alone_in_flight

    # -- requests -------------------------------------------------------------------------

    def opened(self, key: str, tenant: str, task_id: str | None, now_s: float) -> None:
        """A request of `task_id` (None: the request is its own task, named by its key)."""
        if task_id is None:
            self._in_flight[key] = tenant
            self._alone_in_flight += 1
            return
        task_key = (tenant, task_id)
        self._in_flight[key] = task_key
        task = self._tasks.get(task_key)
        if task is None and task_key in self._closed:
            return  # a late request of a closed task: counted under its result as it settles
        if task is None:
            task = self._tasks[task_key] = _Task(last_s=now_s)
            named = self._tenants.get(task_id)
            if named is None:
                self._tenants[task_id] = tenant
            elif isinstance(named, str):
                if named != tenant:
                    self._tenants[task_id] = {named, tenant}
            else:
                named.add(tenant)
        task.in_flight += 1
        self._unrated.pop(task_key, None)
        self._rated.pop(task_key, None)

    def settled(self, s: Settled, now_s: float) -> Figures | None:
        """A request of a task settled. Returns figures to count at once when its task has
        already closed (a late request); None otherwise, or for a request never opened
        (refused before its tenant was known)."""
        task_key = self._in_flight.pop(s.key, None)
        if task_key is None:
            return None
        if isinstance(task_key, str):  # alone: its task closes `grace_s` after this
            if not self._recent.add(s.key, task_key):
                _remember(self._settled, s.key, task_key, self._max_remembered)
            self._alone_in_flight -= 1
            reached = s.reached_upstream
            self._alone[s.key] = _Alone(
                task_key,
                s.model if reached else NO_MODEL,
                reached,
                s.cost_usd if reached else 0.0,
                s.energy_j if reached else 0.0,
                s.tokens if reached else 0,
                self._early.pop(s.key, None) if self._early else None,
                now_s,
            )
            self._alone_queue.append((now_s, s.key))
            return None
        _remember(self._settled, s.key, task_key, self._max_remembered)
        task = self._tasks.get(task_key)
        if task is None:  # closed while this request was in flight (evicted), or long ago
            closed = self._closed.get(task_key)
            if closed is None or not s.reached_upstream:
                return None
            result, model = closed
            return Figures(s.tenant, model, Result(result), s.cost_usd, s.energy_j, s.tokens, False)
        task.in_flight -= 1
        if s.reached_upstream:
            task.reached += 1
            task.cost_usd += s.cost_usd
            task.energy_j += s.energy_j
            task.tokens += s.tokens
            by_model = task.tokens_by_model
            if by_model is None:
                task.tokens_by_model = {s.model: s.tokens}
            else:
                by_model[s.model] = by_model.get(s.model, 0) + s.tokens
        task.last_s = now_s
        if task.in_flight == 0:
            self._quiet(task_key, task)
        return None

    def request(self, key: str) -> TaskKey | None:
        """The task of a request in flight or settled recently."""
        found = self._in_flight.get(key)
        if found is None:
            found = self._settled.get(key)
        if found is None:
            found = self._alone_tenant(key) or self._recent.get(key)
        return (found, key) if isinstance(found, str) else found

    def _alone_tenant(self, key: str) -> str | None:
        """The tenant of a request alone still open (in flight, or settled and not closed)."""
        found = self._alone.get(key)
        if found is not None:
            return found.tenant
        flying = self._in_flight.get(key)
        return flying if isinstance(flying, str) else None

    def is_open(self, task_key: TaskKey) -> bool:
        return task_key in self._tasks or self._alone_tenant(task_key[1]) == task_key[0]

    def knows(self, task_key: TaskKey) -> bool:
        if task_key in self._tasks or task_key in self._closed:
            return True
        return self.request(task_key[1]) == task_key  # a request alone, open or recent

    def tenants(self, task_id: str) -> set[str]:
        """The tenants with an open task of this id (closed ones: ask the store)."""
        named = self._tenants.get(task_id)
        if named is None:
            return set()
        return {named} if isinstance(named, str) else set(named)

    def in_flight(self, task_key: TaskKey) -> int:
        task = self._tasks.get(task_key)
        if task is None:
            return int(self._in_flight.get(task_key[1]) == task_key[0])
        return task.in_flight

    # -- reports --------------------------------------------------------------------------

    def report(self, task_key: TaskKey, report: Report, now_s: float) -> bool:
        """The last report wins. False when the task has closed already (counted as it was)."""
        task = self._tasks.get(task_key)
        if task is None:
            return self._report_alone(task_key, report, now_s)
        task.report = report
        task.last_s = now_s
        if task.in_flight == 0:
            self._unrated.pop(task_key, None)
            self._rated.pop(task_key, None)
            self._quiet(task_key, task)
        return True

    def _report_alone(self, task_key: TaskKey, report: Report, now_s: float) -> bool:
        tenant, key = task_key
        found = self._alone.get(key)
        if found is not None and found.tenant == tenant:
            found.report, found.last_s = report, now_s
            self._alone_queue.append((now_s, key))  # its earlier place goes stale
            return True
        if self._in_flight.get(key) == tenant:
            self._early[key] = report
            return True
        return False

    # -- closing --------------------------------------------------------------------------

    def due(self, now_s: float, idle_s: float, grace_s: float) -> list[Figures]:
        """Close every task quiet long enough (and the longest idle beyond `max_open`)."""
        return self.close_due(now_s, idle_s, grace_s, None)[0]

    def close_due(
        self, now_s: float, idle_s: float, grace_s: float, limit: int | None
    ) -> tuple[list[Figures], bool]:
        """As `due`, closing at most `limit` tasks (counted or not: a task of refusals alone
        closes without figures); also whether more may be due."""
        closed: list[Figures] = []
        n = 0
        for queue, wait_s in ((self._rated, grace_s), (self._unrated, idle_s)):
            while queue:
                if limit is not None and n >= limit:
                    return closed, True
                task_key = next(iter(queue))
                if self._tasks[task_key].last_s > now_s - wait_s:
                    break
                closed.extend(self._close(task_key))
                n += 1
        cut_s = now_s - grace_s  # a request alone waits only for its report, like a rated task
        while (head := self._alone_head()) is not None and head[0] <= cut_s:
            if limit is not None and n >= limit:
                return closed, True
            closed.extend(self._close_alone(head[1]))
            n += 1
        while self.open_tasks > self._max_open:
            if limit is not None and n >= limit:
                return closed, True
            quiet = self._longest_quiet()
            if quiet is None:
                break  # every open task has a request in flight
            if isinstance(quiet, str):
                closed.extend(self._close_alone(quiet))
            else:
                closed.extend(self._close(quiet))
            n += 1
        return closed, False

    def _alone_head(self) -> tuple[float, str] | None:
        """The request alone quiet longest (stale places dropped on the way)."""
        queue = self._alone_queue
        while queue:
            last_s, key = queue[0]
            found = self._alone.get(key)
            if found is not None and found.last_s == last_s:
                return last_s, key
            queue.popleft()
        return None

    def _longest_quiet(self) -> TaskKey | str | None:
        """The task quiet longest: a named task's key, a request alone's (a string), or None
        when no task is quiet."""
        heads: list[tuple[float, TaskKey | str]] = [
            (self._tasks[key].last_s, key)
            for queue in (self._rated, self._unrated)
            if queue
            for key in (next(iter(queue)),)
        ]
        alone = self._alone_head()
        if alone is not None:
            heads.append(alone)
        return min(heads, key=lambda head: head[0])[1] if heads else None

    def _quiet(self, task_key: TaskKey, task: _Task) -> None:
        queue = self._rated if task.report is not None else self._unrated
        queue[task_key] = None
        queue.move_to_end(task_key)

    def _close_alone(self, key: str) -> list[Figures]:
        """Close the request alone at the head of its queue (see `_alone_head`)."""
        self._alone_queue.popleft()
        found = self._alone.pop(key)
        if not found.reached and found.report is None:
            return []  # a refusal nobody rated: not a task anyone ran
        result = found.report.result if found.report is not None else Result.UNKNOWN
        return [
            Figures(
                found.tenant,
                found.model,
                result,
                found.cost_usd,
                found.energy_j,
                found.tokens,
                True,
            )
        ]

    def _close(self, task_key: TaskKey) -> list[Figures]:
        task = self._tasks.pop(task_key)
        named = self._tenants.get(task_key[1])
        if isinstance(named, str):
            if named == task_key[0]:
                del self._tenants[task_key[1]]
        elif named is not None:
            named.discard(task_key[0])
            if len(named) == 1:
                self._tenants[task_key[1]] = next(iter(named))
        self._unrated.pop(task_key, None)
        self._rated.pop(task_key, None)
        if task.reached == 0 and task.report is None:
            return []  # only refusals, and nobody asked: not a task anyone ran (yet)
        result = task.report.result if task.report is not None else Result.UNKNOWN
        model = task.model()
        _remember(self._closed, task_key, (result.value, model), self._max_remembered)
        return [
            Figures(task_key[0], model, result, task.cost_usd, task.energy_j, task.tokens, True)
        ]


def _remember(into: collections.OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    into[key] = value
    into.move_to_end(key)
    while len(into) > limit:
        into.popitem(last=False)


class RecentAlone:
    """The tenants of recently settled requests sent alone, without an object per request:
    the proxy's request keys are a process prefix and a sequence number, so the last `size`
    of them sit in a ring of machine integers (a tenant index per slot, checked by the number)
    that grows with the traffic. A key of another form or process is not kept here (`add`
    returns False)."""

    def __init__(self, size: int) -> None:
        self._max = size
        self._prefix: str | None = None
        self._numbers = array.array("q")  # slot -> the sequence number it holds (0: none)
        self._tenants = array.array("H")  # slot -> index into _names
        self._names: list[str] = []
        self._index: dict[str, int] = {}

    def _number(self, key: str, learn: bool = False) -> int | None:
        prefix, _, digits = key.rpartition("-")
        # The keys' own form only (ASCII, no leading zero): a client's "-²" or "-0001" is not
        # a number here, and no other spelling aliases a key.
        if not prefix or not digits.isascii() or not digits.isdigit() or digits[0] == "0":
            return None
        if self._prefix is None and learn:  # the first key settled here names the process
            self._prefix = prefix
        return int(digits) if prefix == self._prefix else None

    def add(self, key: str, tenant: str) -> bool:
        number = self._number(key, learn=True)
        if number is None or number <= 0:
            return False
        index = self._index.get(tenant)
        if index is None:
            if len(self._names) > 0xFFFF:
                return False
            index = self._index[tenant] = len(self._names)
            self._names.append(tenant)
        if number >= len(self._numbers) and len(self._numbers) < self._max:
            self._grow(number)
        slot = number % len(self._numbers)
        if self._numbers[slot] > number:
            return False  # a long request settling after a newer one took its slot: elsewhere
        self._numbers[slot] = number
        self._tenants[slot] = index
        return True

    def _grow(self, number: int) -> None:
        old_numbers, old_tenants = self._numbers, self._tenants
        size = max(1024, len(old_numbers))
        while size <= number and size < self._max:
            size *= 2
        size = min(size, self._max)
        self._numbers = array.array("q", bytes(8 * size))
        self._tenants = array.array("H", bytes(2 * size))
        for n, t in zip(old_numbers, old_tenants, strict=True):
            if n:
                self._numbers[n % size], self._tenants[n % size] = n, t

    def get(self, key: str) -> str | None:
        number = self._number(key)
        if number is None or not self._numbers:
            return None
        slot = number % len(self._numbers)
        return self._names[self._tenants[slot]] if self._numbers[slot] == number else None
