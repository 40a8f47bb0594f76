"""`serve --workers N`: N proxy processes on one port, and the one host process they share.

The supervisor (this module, in the process the user started) holds no metrics and serves no
request. It starts the host process (host.py: the energy sampler, the local quota), then N
workers, each a full proxy listening on the same port with SO_REUSEPORT (the kernel spreads
connections), each writing the same ledger (SQLite WAL, busy timeout; rows keyed by the unique
request key) and its metrics to the host's shared directory (prometheus_client's multiprocess
files), so /metrics from any worker reports the whole host. A worker that dies is restarted;
its counters stay in its files, so no total ever goes back. SIGTERM drains the workers, then
stops the host; SIGHUP is passed to the workers (each reloads its configuration).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .app import PortInUse
from .config import Settings
from .ledger import LEDGER_SCHEMA
from .metrics import process_died
from .store.base import open_store

log = logging.getLogger(__name__)

FAST_CRASH_S = 5.0  # a child that dies sooner than this after starting is restarted more slowly
MAX_BACKOFF_S = 30.0


@dataclass(eq=False)
class Child:
    name: str
    args: list[str]
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    crashes: int = 0


class Supervisor:
    def __init__(
        self, settings: Settings, argv: Sequence[str], environ: Mapping[str, str], workdir: str
    ) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.workdir = workdir
        self.metrics_dir = os.path.join(workdir, "metrics")
        self.link = os.path.join(workdir, "host.sock")
        self.env = {**environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        self.stopping = asyncio.Event()
        self.children: list[Child] = []

    async def spawn(self, child: Child) -> None:
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meterproxy",
            *self.argv,
            *child.args,
            env=self.env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
        )
        child.started = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    async def keep(self, child: Child) -> None:
        """Restart `child` whenever it exits, until the supervisor stops."""
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            process_died(self.metrics_dir, child.proc.pid)
            if self.stopping.is_set():
                return
            fast = time.monotonic() - child.started < FAST_CRASH_S
            child.crashes = child.crashes + 1 if fast else 0
            delay = min(0.5 * 2**child.crashes, MAX_BACKOFF_S) if fast else 0.1
            log.error("%s (pid %d) exited with %s; restarting it", child.name, child.proc.pid, code)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            await self.spawn(child)

    async def wait_for_host(self, host: Child, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert host.proc is not None
            if host.proc.returncode is not None:
                return False
            try:
                reader, writer = await asyncio.open_unix_connection(self.link)
                await reader.readline()  # the host's hello: it is serving
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return True
        return False

    async def signal_all(self, children: Sequence[Child], sig: int) -> None:
        for child in children:
            if child.proc is not None and child.proc.returncode is None:
                child.proc.send_signal(sig)

    async def stop_all(self, children: Sequence[Child], grace_s: float) -> None:
        await self.signal_all(children, signal.SIGTERM)
        procs = [c.proc for c in children if c.proc is not None]
        waiting = [asyncio.ensure_future(p.wait()) for p in procs]
        if not waiting:
            return
        _, late = await asyncio.wait(waiting, timeout=grace_s)
        for p in procs:
            if p.returncode is None:
                log.error("pid %d did not stop within %.0f s; killing it", p.pid, grace_s)
                p.kill()
        if late:
            await asyncio.gather(*late, return_exceptions=True)


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (not listen) with SO_REUSEPORT: holds the port number, 0 picks a free one, and
    takes no connections itself; the workers' listening sockets join it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    if port:
        # First without SO_REUSEPORT: a port held by anything, even another SO_REUSEPORT
        # proxy of the same user (which the kernel would let us join), is refused.
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(host, port) from None
                raise
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock, int(sock.getsockname()[1])


async def supervise(settings: Settings, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Run `settings.server.workers` workers and their host process; returns the exit code."""
    server = settings.server
    held, port = reserve_port(server.host, server.port)
    if settings.ledger.enabled:  # created and migrated once, before several writers open it
        store = open_store(settings.ledger.store_url, LEDGER_SCHEMA)
        await store.open()
        await store.close()
    workdir = tempfile.mkdtemp(prefix="meterproxy-")
    sup = Supervisor(settings, argv, environ, workdir)
    os.mkdir(sup.metrics_dir)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sup.stopping.set)
    try:
        host = Child("host process", ["--role", "host", "--link", sup.link])
        await sup.spawn(host)
        if not await sup.wait_for_host(host):
            log.error("the host process did not start; see its log above")
            await sup.stop_all([host], 5.0)
            return 1
        workers = [
            Child(
                f"worker {i}",
                [
                    "--role",
                    "worker",
                    "--link",
                    sup.link,
                    "--worker-index",
                    str(i),
                    "--port",
                    str(port),
                ],
            )
            for i in range(server.workers)
        ]
        for worker in workers:
            await sup.spawn(worker)
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: loop.create_task(sup.signal_all(workers, signal.SIGHUP)),
        )
        keepers = [asyncio.create_task(sup.keep(c)) for c in (host, *workers)]
        log.info(
            "meterproxy: %d workers on %s:%d (supervisor pid %d)",
            len(workers),
            server.host,
            port,
            os.getpid(),
        )
        await sup.stopping.wait()
        log.info("shutting down: draining the workers (up to %ss)", server.drain_timeout_s)
        await sup.stop_all(workers, server.unready_delay_s + server.drain_timeout_s + 10)
        await sup.stop_all([host], 15.0)
        await asyncio.gather(*keepers, return_exceptions=True)
        log.info("stopped")
        return 0
    finally:
        held.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def watch_parent(stop: asyncio.Event, interval_s: float = 1.0) -> None:
    """A worker or host whose supervisor died (killed, not stopped) stops too, rather than
    serving on unsupervised."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(interval_s)
        if os.getppid() != parent:
            log.error("the supervisor (pid %d) is gone; stopping", parent)
            stop.set()
