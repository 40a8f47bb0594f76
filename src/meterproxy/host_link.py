"""A worker's link to the host process of `serve --workers N` (host.py): the energy sampler and
the local quota that every worker of the host shares, over one Unix socket.

`RemoteEnergy` (an EnergyBackend) forwards each request's energy events, keyed by the proxy's
request key, and receives its joules once they are final; `RemoteQuota` (a QuotaBackend) asks
the host to admit and tells it what was settled. Events are buffered and written once per
event-loop iteration. Messages are JSON arrays, one per line:

    worker -> host   s start, f first token, d decoded, u usage, e end, w wait for energy,
                     a admit (with an id), q settle quota
    host -> worker   h hello (energy on?), j energy of a key, A admitted, R refused (an id)

When the host is gone (restarting), energy is unknown (None), admissions follow
`quota.on_backend_error`, and quota settlements wait in a bounded outbox; the link reconnects
by itself.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .energy.backend import Done, Group
from .errors import QuotaExhausted, QuotaUnavailable, RateLimited
from .policy import Tenancy, Tenant
from .quota import Ticket
from .quota_settings import QuotaBackendSettings

if TYPE_CHECKING:
    from .config import Settings
    from .metrics import Metrics
    from .settlement import Settlement

log = logging.getLogger(__name__)

RECONNECT_S = 0.2
MAX_OUTBOX = 100_000  # quota settlements held while the host restarts


@dataclass(frozen=True)
class WorkerContext:
    """What makes a process one worker of `serve --workers`."""

    link_path: str  # the host process's Unix socket
    metrics_dir: str  # PROMETHEUS_MULTIPROC_DIR, shared by the host's processes
    index: int

    def own_spill_files(self, settings: Settings) -> Settings:
        """Spill files are one process's: each worker gets its own, by index (so a worker
        restarted in its place replays what its predecessor spilled)."""
        ledger = settings.ledger
        ledger = dataclasses.replace(ledger, spill_path=f"{ledger.spill_file}.worker{self.index}")
        cloudevents = settings.export.cloudevents
        if cloudevents.spill_path:
            cloudevents = dataclasses.replace(
                cloudevents, spill_path=f"{cloudevents.spill_path}.worker{self.index}"
            )
        export = dataclasses.replace(settings.export, cloudevents=cloudevents)
        return dataclasses.replace(settings, ledger=ledger, export=export)


class HostLink:
    def __init__(self, path: str, metrics: Metrics) -> None:
        self.path = path
        self._metrics = metrics
        self._writer: asyncio.StreamWriter | None = None
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        self._outbox: collections.deque[bytes] = collections.deque()
        self._calls: dict[int, asyncio.Future[list[Any]]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.energy_on = False
        self.energy: RemoteEnergy | None = None  # set by RemoteEnergy
        self._up = metrics.quota_backend_up.labels("host")

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def open(self, wait_s: float = 10.0) -> None:
        """Connect (the host is started first; give it a moment), then keep the link up."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="host-link")
        try:
            await asyncio.wait_for(self._connected.wait(), wait_s)
        except asyncio.TimeoutError:
            log.error("host process not reachable at %s; retrying in the background", self.path)

    async def close(self) -> None:
        self._flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
        self._lost()

    # -- sending --------------------------------------------------------------------------

    def send(self, message: list[Any], *, keep: bool = False) -> None:
        """Buffered until the end of this loop iteration; `keep`: held while disconnected."""
        line = orjson.dumps(message) + b"\n"
        if self._writer is None:
            if keep:
                if len(self._outbox) >= MAX_OUTBOX:
                    self._outbox.popleft()
                    self._metrics.quota_backend_errors.labels("host", "dropped").inc()
                self._outbox.append(line)
            return
        self._buffer.append(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._buffer and self._writer is not None:
            self._writer.write(b"".join(self._buffer))
        self._buffer.clear()

    async def call(self, message: list[Any], timeout_s: float) -> list[Any]:
        """A request with an answer; raises ConnectionError or TimeoutError."""
        if self._writer is None:
            raise ConnectionError("the host process is not connected")
        call_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._calls[call_id] = future
        self.send([message[0], call_id, *message[1:]])
        timer = loop.call_later(timeout_s, _expire, future)  # (wait_for would start a task)
        try:
            return await future
        finally:
            timer.cancel()
            self._calls.pop(call_id, None)

    # -- receiving ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=2**20)
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            self._writer = writer
            self._connected.set()
            self._up.set(1)
            log.info("connected to the host process at %s", self.path)
            while self._outbox:  # quota settlements held while it was away
                writer.write(self._outbox.popleft())
            try:
                async for message in messages(reader):
                    self._receive(message)
            except (OSError, orjson.JSONDecodeError, ValueError) as exc:
                log.error("link to the host process broke: %s", exc)
            finally:
                writer.close()
                self._lost()
            self._metrics.quota_backend_errors.labels("host", "link").inc()
            log.error("the host process went away; reconnecting")
            await asyncio.sleep(RECONNECT_S)

    def _receive(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "j":
            if self.energy is not None:
                self.energy.final(message[1], message[2], message[3])
        elif kind in ("A", "R"):
            future = self._calls.get(message[1])
            if future is not None and not future.done():
                future.set_result(message)
        elif kind == "h":
            self.energy_on = bool(message[1])

    def _lost(self) -> None:
        self._writer = None
        self._connected.clear()
        self._up.set(0)
        self._buffer.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(ConnectionError("the host process went away"))
        if self.energy is not None:
            self.energy.lost()


async def messages(reader: asyncio.StreamReader) -> AsyncIterator[list[Any]]:
    """The JSON arrays on a link, one per line, read as many at a time as have arrived."""
    rest = b""
    while chunk := await reader.read(1 << 16):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield orjson.loads(line)


def _expire(future: asyncio.Future[list[Any]]) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


class RemoteEnergy:
    """EnergyBackend: the host's tracker meters; this worker reports and waits."""

    def __init__(self, link: HostLink, upstream_gpus: Mapping[str, tuple[str, ...]]) -> None:
        self._link = link
        self._metered = {name for name, gpus in upstream_gpus.items() if gpus}
        self._tracked: set[str] = set()
        self._waiting: dict[str, Done] = {}
        link.energy = self

    def start(
        self, key: str, upstream: str, group: Group, prompt_tokens: int, streamed: bool
    ) -> None:
        if upstream in self._metered and self._link.energy_on and self._link.connected:
            self._tracked.add(key)
            self._link.send(["s", key, upstream, *group, prompt_tokens, streamed])

    def first_token(self, key: str, t_ns: int) -> None:
        if key in self._tracked:
            self._link.send(["f", key, t_ns])  # CLOCK_MONOTONIC: one clock for the whole host

    def decoded(self, key: str, tokens: int) -> None:
        if key in self._tracked and tokens > 0:
            self._link.send(["d", key, tokens])

    def usage(
        self, key: str, prompt: int | None, cached_prompt: int | None, completion: int | None
    ) -> None:
        if key in self._tracked:
            self._link.send(["u", key, prompt, cached_prompt, completion])

    def end(self, key: str) -> None:
        if key in self._tracked:
            self._link.send(["e", key])

    def defer(self, key: str, done: Done) -> bool:
        if key not in self._tracked:
            return False
        if not self._link.connected:
            self._tracked.discard(key)
            return False
        self._waiting[key] = done
        self._link.send(["w", key])
        return True

    def final(self, key: str, joules: float | None, gpu_seconds: float) -> None:
        self._tracked.discard(key)
        done = self._waiting.pop(key, None)
        if done is not None:
            done(joules, gpu_seconds)

    def lost(self) -> None:
        """The host went away: what was waiting completes with energy unknown."""
        waiting, self._waiting = self._waiting, {}
        self._tracked.clear()
        for done in waiting.values():
            done(None, 0.0)


class RemoteQuota:
    """QuotaBackend: the host process admits for every worker (one process, so atomic)."""

    def __init__(
        self, link: HostLink, settings: QuotaBackendSettings, tenancy: Tenancy, metrics: Metrics
    ) -> None:
        self._link, self._settings, self._metrics = link, settings, metrics
        self._zone = tenancy.timezone

    def reconfigure(self, tenancy: Tenancy) -> None:
        self._zone = tenancy.timezone  # limits travel with each admission

    async def admit(self, tenant: Tenant, estimate: int, key: str, *, capped: bool) -> Ticket:
        limits = tenant.limits
        message = [
            "a",
            tenant.name,
            [
                limits.requests_per_minute,
                limits.tokens_per_minute,
                limits.tokens_per_day,
                limits.usd_per_month,
                limits.joules_per_day,
                limits.max_concurrent,
                limits.max_tokens_per_request,
            ],
            estimate,
            key,
            capped,
            self._zone,
        ]
        try:
            reply = await self._link.call(message, self._settings.timeout_s * 10)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            self._metrics.quota_backend_errors.labels("host", "admit").inc()
            return self._unavailable(tenant, exc)
        if reply[0] == "A":
            return Ticket(tenant.name, reply[2], None, None, reply[3])
        _, _, kind, text, limit, retry_after_s, headers = reply
        refusal = RateLimited if kind == "rate" else QuotaExhausted
        raise refusal(text, limit=limit, retry_after_s=retry_after_s, headers=headers)

    def _unavailable(self, tenant: Tenant, exc: BaseException) -> Ticket:
        if self._settings.fails_closed(tenant.limits):
            raise QuotaUnavailable(
                "this host's quota process is restarting, so the limits of tenant "
                f"`{tenant.name}` cannot be checked and they fail closed "
                "(quota.on_backend_error); retry shortly"
            )
        self._metrics.quota_unchecked.labels(tenant.name).inc()
        return Ticket(tenant.name, 0, None, None, "")  # the host charges it to today

    def settle(self, settlement: Settlement) -> None:
        ticket = settlement.ticket
        if ticket is None:
            return
        usage = settlement.usage
        self._link.send(
            [
                "q",
                settlement.request_id,
                ticket.tenant,
                ticket.day,
                (usage.prompt or 0) + (usage.completion or 0),
                settlement.cost_usd,
                settlement.energy_j or 0.0,
            ],
            keep=True,
        )

    async def open(self) -> None:
        pass

    async def run(self) -> None:
        await asyncio.Event().wait()  # the link does the work

    async def close(self) -> None:
        pass
