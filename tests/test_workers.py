"""`meterproxy serve --workers 2` as a real process tree: quotas exact across workers (the host
process's local quota, or Redis), /metrics from any worker reporting the whole host, a complete
ledger, GPU energy conserved with one sampler for both workers, and a killed worker restarted
without a counter going back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meterproxy import workers
from meterproxy.app import PortInUse
from meterproxy.sim.upstream import Behavior

from .conftest import StartUpstream, Upstream
from .redis_support import redis_running
from .test_cli_serve import Process, launch

KEY = "workers-research-key"
OPS_KEY = "workers-ops-key"
MESSAGES = [{"role": "user", "content": "count the foxes"}]


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


def children(pid: int) -> dict[int, str]:
    """pid -> command line of each child of `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def listening(pids: set[int], port: int) -> set[int]:
    """Which of `pids` hold a socket listening on `port` (/proc/net/tcp, state 0A)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    found = set()
    for pid in pids:
        try:
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        if any(link[8:-1] in inodes for link in links if link.startswith("socket:[")):
            found.add(pid)
    return found


async def all_workers_listening(proxy: Process) -> dict[int, str]:
    for _ in range(200):
        workers = {p: c for p, c in children(proxy.proc.pid).items() if "--role worker" in c}
        if len(workers) == 2 and listening(set(workers), proxy.port) == set(workers):
            return workers
        await asyncio.sleep(0.05)
    raise AssertionError("the workers are not both listening")


def samples(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric in an exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, value = line[len(name) :].rsplit(" ", 1)
            out[labels] = float(value)
    return out


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:  # new conn
        return await r.text()


async def traffic(url: str, n: int) -> list[int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(i: int) -> int:
            body = {"model": "sim-llama", "messages": MESSAGES, "stream": i % 2 == 0}
            async with http.post(
                url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {KEY}"},
            ) as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_two_workers_share_quota_energy_metrics_and_ledger(
    start_upstream: StartUpstream,
    processes: list[Process],
    tmp_path: Path,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        quota: dict[str, Any] = {"state_path": str(tmp_path / "quota.db")}
        if backend == "redis":
            redis = await stack.enter_async_context(redis_running(tmp_path / "redis"))
            quota |= {"backend": "redis", "redis_url": redis.url, "timeout_s": 1}
        await two_workers(start_upstream, processes, tmp_path, quota, monkeypatch)


async def two_workers(
    start_upstream: StartUpstream,
    processes: list[Process],
    tmp_path: Path,
    quota: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    up: Upstream = await start_upstream(
        {
            "sim-llama": Behavior(tokens=12, pace_s=0.01),
            "sim-slow": Behavior(tokens=300, pace_s=0.01),
        }
    )
    cfg = tmp_path / "meterproxy.yaml"
    cfg.write_text(
        f"upstreams: [{{name: gpu, url: '{up.url}', kind: vllm, gpus: [0]}}]\n"
        "energy: {source: simulated, interval_s: 0.1}\n"
        "server: {unready_delay_s: 0, drain_timeout_s: 5, workers: 2}\n"
        f"ledger: {{path: '{tmp_path / 'usage.db'}'}}\n"
        f"quota: {quota}\n"
        "tenants:\n"
        "  research: {keys: ['env:RESEARCH_KEY'], limits: {requests_per_minute: 40}}\n"
        "  ops: {keys: ['env:OPS_KEY']}\n"
    )
    monkeypatch.setenv("RESEARCH_KEY", KEY)  # read by the child processes at start
    monkeypatch.setenv("OPS_KEY", OPS_KEY)
    proxy = await launch("--config", str(cfg), cwd=tmp_path)
    processes.append(proxy)
    await all_workers_listening(proxy)
    tree = children(proxy.proc.pid)
    assert sorted(re.search(r"--role (\w+)", c).group(1) for c in tree.values()) == [  # type: ignore[union-attr]
        "host",
        "worker",
        "worker",
    ]

    statuses = await traffic(proxy.url, 60)
    assert statuses.count(200) == 40 and statuses.count(429) == 20  # exact across workers
    assert len(up.fake.seen) == 40
    await asyncio.sleep(1.0)  # the last requests' energy is final; the ledgers have written

    texts = [await scrape(proxy.url) for _ in range(6)]  # the kernel picks the worker
    for text in texts:
        requests = samples(text, "meterproxy_requests_total")
        assert sorted(requests.values()) == [20.0, 40.0], requests
    text = texts[-1]
    # The minute's 40 of 40 requests, from the quota's one process (the host's, or Redis),
    # written to the shared files within a second by the host.
    rpm = '{limit="requests_per_minute",tenant="research"}'
    for _ in range(30):
        ratio = samples(await scrape(proxy.url), "meterproxy_quota_usage_ratio").get(rpm)
        if ratio is not None:
            break
        await asyncio.sleep(0.1)
    assert ratio == 1.0
    measured = sum(samples(text, "meterproxy_gpu_energy_joules_total").values())
    idle = sum(samples(text, "meterproxy_gpu_idle_energy_joules_total").values())
    attributed = sum(samples(text, "meterproxy_energy_joules_total").values())
    assert attributed > 0 and idle > 0
    assert attributed + idle == pytest.approx(measured, abs=1e-3)  # one sampler, every request
    # The host's gauges reach the shared files stamped, so the merged scrape keeps them.
    assert samples(text, "meterproxy_gpu_power_watts") and all(
        w > 0 for w in samples(text, "meterproxy_gpu_power_watts").values()
    )
    assert samples(text, "meterproxy_gpu_energy_model_windows")

    db = sqlite3.connect(tmp_path / "usage.db")
    rows = db.execute("SELECT request_id, status, energy_j FROM requests").fetchall()
    assert len(rows) == 60 and len({r[0] for r in rows}) == 60
    served_by = {r[0].rsplit("-", 1)[0] for r in rows}  # each process has its own key prefix
    assert len(served_by) == 2, "both workers served requests"
    assert all(r[2] is not None and r[2] > 0 for r in rows if r[1] == "200")
    assert sum(r[2] or 0 for r in rows) == pytest.approx(attributed, abs=1e-3)

    # A worker killed outright: restarted; its counts stay in the host's totals.
    victim = next(pid for pid, c in tree.items() if "--role worker" in c)
    os.kill(victim, signal.SIGKILL)
    await asyncio.sleep(0.2)
    assert victim not in await all_workers_listening(proxy)  # restarted
    for _ in range(4):
        requests = samples(await scrape(proxy.url), "meterproxy_requests_total")
        assert sorted(requests.values()) == [20.0, 40.0], requests
    assert (await traffic(proxy.url, 5)).count(429) == 5  # the minute's 40 are still spent

    # Requests in flight, whichever worker relays them, are in the host's gauge (written to
    # the shared files once a second).
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        body = {"model": "sim-slow", "messages": MESSAGES, "stream": True}
        auth = {"Authorization": f"Bearer {OPS_KEY}"}
        slow = [
            await stack.enter_async_context(
                http.post(proxy.url + "/v1/chat/completions", json=body, headers=auth)
            )
            for _ in range(3)
        ]
        assert [r.status for r in slow] == [200, 200, 200]
        await asyncio.sleep(1.5)
        inflight = samples(await scrape(proxy.url), "meterproxy_inflight_requests")
        assert sum(inflight.values()) == 3, inflight

    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proxy.proc.wait(), 20) == 0
    assert children(proxy.proc.pid) == {}
    assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 68  # 60 + 5 + 3 slow


def test_a_port_another_reuseport_process_holds_is_refused_not_joined() -> None:
    """The kernel lets a second SO_REUSEPORT socket of the same user join a port: a second
    `serve --workers` on a taken port would silently share it. The probe refuses it."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is already in use"):
            workers.reserve_port("127.0.0.1", port)
    held, free = workers.reserve_port("127.0.0.1", 0)  # 0: any free port, no probe needed
    with held:
        assert free > 0
