"""The host process of `serve --workers N`: what there must be only one of on a host, serving
every worker over a Unix socket (host_link.py is the other end).

- One energy sampler: the GPUs' readings are split among the requests of every worker, so
  conservation holds exactly (attributed + idle = measured), however the kernel spread the
  connections.
- The local quota (`quota.backend: local`): one process admits for all workers, so the limits
  are exact, and day and month spend is persisted as in a single process.

A worker that goes away has its requests ended and its reservations released. Metrics go to the
host's shared files, so every worker's /metrics shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from .backends import EnergyBackend
from .energy.local import LocalEnergy
from .errors import QuotaExhausted, RateLimited
from .host_link import messages
from .metrics import Metrics
from .policy import Limits, Tenancy, Tenant
from .quota import Ticket
from .quota_local import LocalQuota
from .workers import watch_parent

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .config import Settings

log = logging.getLogger(__name__)


class _Worker:
    """One connected worker: what it started and what it reserved, to clean up if it dies."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.started: set[str] = set()  # energy: started and not ended
        self.tickets: dict[str, Ticket] = {}  # quota: admitted and not settled
        self.buffer: list[bytes] = []
        self.scheduled = False
        self.closed = False

    def send(self, message: list[Any]) -> None:
        if self.closed:
            return
        self.buffer.append(orjson.dumps(message) + b"\n")
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.buffer and not self.closed:
            self.writer.write(b"".join(self.buffer))
        self.buffer.clear()


class Host:
    def __init__(
        self,
        energy: EnergyBackend,
        quota: LocalQuota | None,
        tenancy: Tenancy,
        wall_clock: Callable[[], float],
    ) -> None:
        self.energy, self.quota = energy, quota
        self._tenancy = tenancy
        self._wall_clock = wall_clock
        self.workers: set[_Worker] = set()

    @property
    def energy_on(self) -> bool:
        return isinstance(self.energy, LocalEnergy) and self.energy.tracker is not None

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker = _Worker(writer)
        self.workers.add(worker)
        worker.send(["h", self.energy_on])
        try:
            async for message in messages(reader):
                self._handle(worker, message)
        except (OSError, orjson.JSONDecodeError, ValueError) as exc:
            log.error("a worker's link broke: %s", exc)
        finally:
            self._gone(worker)
            writer.close()

    def _handle(self, worker: _Worker, m: list[Any]) -> None:
        kind, energy = m[0], self.energy
        if kind == "d":
            energy.decoded(m[1], m[2])
        elif kind == "s":
            _, key, upstream, model, upstream_label, tenant, prompt_tokens, streamed = m
            worker.started.add(key)
            energy.start(key, upstream, (model, upstream_label, tenant), prompt_tokens, streamed)
        elif kind == "f":
            energy.first_token(m[1], m[2])
        elif kind == "u":
            energy.usage(m[1], m[2], m[3], m[4])
        elif kind == "e":
            worker.started.discard(m[1])
            energy.end(m[1])
        elif kind == "w":
            key = m[1]

            def done(joules: float | None, gpu_seconds: float, key: str = key) -> None:
                worker.send(["j", key, joules, gpu_seconds])

            if not energy.defer(key, done):
                done(None, 0.0)
        elif kind == "a":
            self._admit(worker, m)
        elif kind == "q":
            self._settle(worker, m)
        else:
            log.error("unknown message %r from a worker", kind)

    def _admit(self, worker: _Worker, m: list[Any]) -> None:
        _, call_id, name, limits, estimate, key, capped, timezone = m
        if self.quota is None:
            worker.send(["R", call_id, "rate", "no local quota on this host", "backend", 1, {}])
            return
        tenant = self._tenant(name, Limits(*limits), timezone)
        try:
            ticket = self.quota.quota.admit(
                tenant, estimate, self.quota.clock(), self._wall_clock(), capped=capped
            )
        except (RateLimited, QuotaExhausted) as refused:
            kind = "rate" if isinstance(refused, RateLimited) else "budget"
            retry_after = int(refused.headers["retry-after"])
            headers = {k: v for k, v in refused.headers.items() if k != "retry-after"}
            worker.send(["R", call_id, kind, refused.message, refused.limit, retry_after, headers])
            return
        worker.tickets[key] = ticket
        worker.send(["A", call_id, ticket.reserved, ticket.day])

    def _settle(self, worker: _Worker, m: list[Any]) -> None:
        _, key, tenant, day, tokens, usd, joules = m
        if self.quota is None:
            return
        ticket = worker.tickets.pop(key, None)
        if ticket is not None:
            self.quota.settle_amounts(ticket, tokens, usd, joules)
        else:  # admitted unchecked, or its worker's link broke meanwhile: spend still counts
            now_s = self._wall_clock()
            self.quota.quota.charge(
                tenant, day or self.quota.quota.periods(now_s)[0], tokens, usd, joules, now_s
            )

    def _tenant(self, name: str, limits: Limits, timezone: str) -> Tenant:
        """The limits arrive with each admission, so the host never lags a worker's reload."""
        tenancy = self._tenancy
        known = tenancy.tenants.get(name)
        if known is not None and known.limits == limits and tenancy.timezone == timezone:
            return known
        tenants = {**tenancy.tenants, name: Tenant(name, limits=limits)}
        self._tenancy = dataclasses.replace(tenancy, tenants=tenants, timezone=timezone)
        assert self.quota is not None
        self.quota.reconfigure(self._tenancy)
        return tenants[name]

    def _gone(self, worker: _Worker) -> None:
        """A worker died (or is restarting): end what it had in flight."""
        worker.closed = True
        self.workers.discard(worker)
        for key in worker.started:
            self.energy.end(key)
            self.energy.defer(key, lambda joules, gpu_seconds: None)
        if self.quota is not None:
            for ticket in worker.tickets.values():
                self.quota.quota.release(ticket)
        if worker.started or worker.tickets:
            log.warning(
                "a worker left with %d requests in flight: ended, reservations released",
                max(len(worker.started), len(worker.tickets)),
            )


async def serve(
    host: Host,
    path: str,
    metrics: Metrics,
    stop: asyncio.Event,
    *,
    watchdog: bool = True,
) -> None:
    """Open the energy source and the quota store, serve the workers until `stop`, close."""
    energy = host.energy
    background: list[asyncio.Task[None]] = []
    if isinstance(energy, LocalEnergy):
        await energy.open()
        if watchdog:
            background.append(asyncio.create_task(energy.watchdog(), name="energy-watchdog"))
    if host.quota is not None:
        await host.quota.open()
        background.append(asyncio.create_task(host.quota.run(), name="quota-store"))
    if metrics.multiprocess:  # gauges read from functions (the quota's usage ratios)
        background.append(asyncio.create_task(metrics.keep_tracked(), name="tracked-gauges"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(host.connection, path=path, limit=2**20)
    log.info(
        "host process: serving workers at %s (energy %s, local quota %s)",
        path,
        "on" if host.energy_on else "off",
        "on" if host.quota is not None else "off",
    )
    await stop.wait()
    server.close()
    for worker in list(host.workers):
        worker.writer.close()
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    if host.quota is not None:
        await host.quota.close()
    if isinstance(energy, LocalEnergy):
        await energy.close()
    del metrics  # (kept alive until here: the host's metrics live in the shared files)


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM from the supervisor stops the host; a terminal's SIGINT is the supervisor's."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)


async def run(
    settings: Settings, link_path: str, metrics_dir: str, registry: CollectorRegistry
) -> int:
    """The host process's main: its metrics in the shared directory, the configured energy
    source, the local quota (unless Redis holds it), until the supervisor's SIGTERM."""
    from .app import energy_backend  # the same composition as a single process's

    metrics = Metrics(registry, multiprocess_dir=metrics_dir)
    clock, wall_clock = time.monotonic_ns, time.time
    energy = energy_backend(settings, "configured", metrics, clock)
    quota = None
    if settings.quota.backend == "local":
        quota = LocalQuota(settings.tenancy, metrics, clock, wall_clock)
    stop = asyncio.Event()
    stop_on_signals(stop)
    watcher = asyncio.create_task(watch_parent(stop))
    await serve(Host(energy, quota, settings.tenancy, wall_clock), link_path, metrics, stop)
    watcher.cancel()
    return 0
