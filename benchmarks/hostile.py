"""What hostile clients and a broken upstream can hold of the proxy: connections, memory, rows.

    python benchmarks/hostile.py            # about 40 seconds

Starts the fault-injecting upstream (src/meterproxy/sim/faults.py) and `meterproxy serve` as a
separate process with short client timeouts, then, watching the proxy process's open file
descriptors and resident memory from /proc:

1. idle sockets, slowloris heads (a byte every 200 ms) and slow bodies, well beyond
   `server.max_connections`, while a well-behaved client keeps being served;
2. concurrent streams whose upstream sends one 32 MiB line without a newline;
3. a few hundred streams with upstream resets, bad chunked framing and client cuts, after which
   the ledger holds exactly one row per request.

Prints what the proxy held at peak and after each phase. Figures are not asserted (the tests do
that for the behaviour); this is the measurement the hardening issue's closing note quotes.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from meterproxy.sim.faults import Fault, FaultUpstream, Script  # noqa: E402

MAX_CONNECTIONS = 256
HEADERS_S, KEEPALIVE_S, BODY_S = 1.0, 1.0, 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def held(pid: int) -> tuple[int, float]:
    """(open file descriptors, resident MiB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return fds, int(line.split()[1]) / 1024
    return fds, 0.0


class Peak:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fds = self.rss = 0.0

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            fds, rss = held(self.pid)
            self.fds, self.rss = max(self.fds, fds), max(self.rss, rss)
            await asyncio.sleep(0.05)


async def hostile_connections(port: int, proxy_url: str) -> tuple[int, int, list[float]]:
    """Idle, slowloris and slow-body clients, 3x the connection cap; returns how many the
    proxy still held after its timeouts, and a good client's latencies meanwhile."""
    writers: list[asyncio.StreamWriter] = []

    async def one(kind: str) -> None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writers.append(writer)
        try:
            if kind == "slowloris":
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                for byte in b"x-slow: " + b"a" * 200:
                    await asyncio.sleep(0.2)
                    if writer.transport.is_closing():
                        return
                    writer.write(bytes([byte]))
            elif kind == "slowbody":
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                )
                for _ in range(200):
                    await asyncio.sleep(0.2)
                    if writer.transport.is_closing():
                        return
                    writer.write(b" ")
            else:
                await asyncio.sleep(60)
        except (ConnectionError, OSError):
            pass

    tasks = [
        asyncio.create_task(one(("idle", "slowloris", "slowbody")[i % 3]))
        for i in range(3 * MAX_CONNECTIONS)
    ]
    latencies: list[float] = []
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                async with http.get(proxy_url + "/healthz") as r:
                    await r.read()
                latencies.append(time.monotonic() - started)
            except aiohttp.ClientError:
                latencies.append(float("inf"))
            await asyncio.sleep(0.1)
    opened = len(writers)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    still_open = sum(1 for w in writers if not w.transport.is_closing())
    for writer in writers:
        writer.close()
    return opened, still_open, latencies


async def huge_lines(proxy_url: str, n: int) -> list[int]:
    async def one(http: aiohttp.ClientSession) -> int:
        """Bytes the client got before the proxy ended the stream (it resets it)."""
        body = {"model": "huge", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        got = 0
        try:
            async with http.post(proxy_url + "/v1/chat/completions", json=body) as r:
                async for chunk in r.content.iter_any():
                    got += len(chunk)
        except aiohttp.ClientError:
            pass
        return got

    async with aiohttp.ClientSession() as http:
        return await asyncio.gather(*(one(http) for _ in range(n)))


async def chaos(proxy_url: str, n: int, seed: int = 3) -> tuple[int, list[str]]:
    rng = random.Random(seed)
    ids: list[str] = []
    prefix = "chaos"

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        model = rng.choice(["ok", "ok", "reset", "framing"])
        cut = rng.random() < 0.3
        body = {"model": model, "messages": [{"role": "user", "content": f"w {i}"}], "stream": True}
        headers = {"x-request-id": f"{prefix}-{i}"}
        ids.append(f"{prefix}-{i}")
        try:
            async with http.post(
                proxy_url + "/v1/chat/completions", json=body, headers=headers
            ) as r:
                lines = 0
                async for _ in r.content:
                    lines += 1
                    if cut and lines > 3:
                        break
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass

    connector = aiohttp.TCPConnector(limit=32)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(one(http, i) for i in range(n)))
    return n, ids


async def main() -> None:
    faults = FaultUpstream(
        {
            "ok": Script(tokens=16),
            "reset": Script(fault=Fault.RESET, tokens=16, after=4),
            "framing": Script(fault=Fault.BAD_FRAMING, tokens=16, after=4),
            "huge": Script(fault=Fault.HUGE_LINE, after=2, then="done"),
        }
    )
    upstream_url = await faults.start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "hostile.yaml"
        config.write_text(
            f"upstreams: [{{name: f, url: '{upstream_url}', kind: vllm, "
            "timeouts: {idle: 1}}]\n"
            f"server: {{max_connections: {MAX_CONNECTIONS}, "
            f"timeouts: {{headers_s: {HEADERS_S}, keepalive_s: {KEEPALIVE_S}, "
            f"body_s: {BODY_S}}}}}\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meterproxy",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--data-dir",
            tmp,
            "--log-level",
            "ERROR",
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(url + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        assert proc.pid is not None
        # One broken stream first: its tokens are estimated, which loads tiktoken's encoding
        # (~40 MiB, once per process) — not a cost of what follows.
        async with aiohttp.ClientSession() as http:
            body = {
                "model": "reset",
                "messages": [{"role": "user", "content": "w"}],
                "stream": True,
            }
            try:
                async with http.post(url + "/v1/chat/completions", json=body) as r:
                    await r.read()
            except aiohttp.ClientError:
                pass  # the reset, mirrored
        await asyncio.sleep(0.5)
        rest_fds, rest_rss = held(proc.pid)
        print(
            f"at rest (tokenizer loaded): {rest_fds} open descriptors, {rest_rss:.1f} MiB resident"
        )
        peak, stop = Peak(proc.pid), asyncio.Event()
        watcher = asyncio.create_task(peak.watch(stop))

        opened, _, latencies = await hostile_connections(port, url)
        await asyncio.sleep(max(HEADERS_S, KEEPALIVE_S, BODY_S) + 0.5)
        fds, rss = held(proc.pid)
        good = sorted(latencies)
        print(
            f"1. {3 * MAX_CONNECTIONS} hostile connections (idle / slowloris / slow body, cap "
            f"{MAX_CONNECTIONS}): {opened} opened; peak {peak.fds:.0f} descriptors; "
            f"after the timeouts the proxy holds "
            f"{fds} descriptors, {rss:.1f} MiB. A good client meanwhile: "
            f"{sum(1 for x in good if x != float('inf'))}/{len(good)} answered, "
            f"p50 {good[len(good) // 2] * 1000:.1f} ms, max {good[-1] * 1000:.1f} ms"
        )
        got = await huge_lines(url, 4)
        await asyncio.sleep(0.5)
        fds, rss = held(proc.pid)
        print(
            f"2. 4 concurrent streams with a 32 MiB line (limit 4 MiB per event): the clients "
            f"got {max(got) / 2**20:.1f} MiB at most before the cut; peak {peak.rss:.1f} MiB "
            f"resident (rest {rest_rss:.1f} MiB); after: {rss:.1f} MiB"
        )
        n, ids = await chaos(url, 400)
        await asyncio.sleep(1.5)
        stop.set()
        await watcher
        proc.send_signal(2)
        await proc.wait()
        with sqlite3.connect(Path(tmp) / "meterproxy-usage.db") as db:
            rows = dict(
                db.execute(
                    "SELECT client_request_id, count(*) FROM requests "
                    "WHERE client_request_id LIKE 'chaos-%' GROUP BY client_request_id"
                ).fetchall()
            )
        missing = [i for i in ids if i not in rows]
        doubled = [i for i, c in rows.items() if c != 1]
        print(
            f"3. {n} streams with resets, bad framing and client cuts: {len(rows)} rows, "
            f"{len(missing)} lost, {len(doubled)} doubled"
        )
    await faults.close()


if __name__ == "__main__":
    asyncio.run(main())
