"""What metering costs, measured against a direct connection and the bare floor in one run.

    python benchmarks/overhead.py                # the full run (about 12 minutes)
    python benchmarks/overhead.py --quick        # a smoke run (levels 1 and 16, 2 s each)
    python benchmarks/overhead.py --litellm /path/to/venv/bin/litellm   # add LiteLLM

Targets, all in front of one fast simulated vLLM (one token per chunk, no think time):
- `bare aiohttp`: benchmarks/bare_proxy.py, a pass-through with no metering (the floor);
- `serve --upstream`: meterproxy's quick start (ledger, quota store, metrics; no tenants);
- `all meters`: meterproxy with every meter on: tenants with keys and every limit (so each
  request is authenticated, its prompt counted and a quota reserved, its `max_tokens` filled
  in), the ledger, energy from NVML (a fake GPU behind pynvml's API, sampled at 10 Hz by the
  proxy's own NVML source and attributed), and local GPU pricing;
- optionally `metering off` (`--metering-off`: a benchmark-only switch) and LiteLLM.

The upstream, the load generators and this script share core 0; each proxy runs alone on
core 1 (taskset, where the machine has two cores). Measurements, targets interleaved (A, B,
C, ... then again) so drift cancels:
- closed loop (wrk): req/s and latency at 1, 16, 64 and 256 connections for a small chat
  request, a 256-token stream in vLLM's bytes, the same stream in OpenAI's bytes (where every
  chunk carries `"usage":null` once the proxy asks for usage, and the proxy cuts it back out:
  the cost of that rewrite), and a 100 KB prompt; CPU per request and per streamed token from
  the proxy's /proc counters (all its threads);
- open loop: requests sent on a fixed schedule (default 50/s), each timed from its scheduled
  send time, so a stall delays every request behind it and shows (no coordinated omission);
  p50, p99 and the maximum;
- memory: RSS at rest (after warm-up, and again after all the load), per idle open stream,
  and per slowly-read stream (a long stream its client reads at a trickle, so every buffer
  between the upstream and the client fills);
- time to first token and the inter-token gaps of 64 paced streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import wrk_load  # beside this script: the benchmarks' shared wrk driver

ROOT = Path(__file__).resolve().parent.parent
# Every prompt holds wrk_load.UNIQUE: each request sent gets a number of its own there (real
# traffic is not one request repeated, and the value meter flags repeats, a duplicate row each).
MESSAGES = [{"role": "user", "content": "Benchmark the proxy, please. (__N__)"}]
STREAM_TOKENS = 256
SCENARIOS = {
    "chat": {"model": "bench-small", "messages": MESSAGES},
    "stream256": {"model": "bench-stream", "messages": MESSAGES, "stream": True},
    "stream256-openai": {"model": "bench-openai", "messages": MESSAGES, "stream": True},
    "prompt100k": {
        "model": "bench-small",
        "messages": [{"role": "user", "content": "lorem ipsum " * 8533 + "(__N__)"}],
    },
}
STREAMS = ("stream256", "stream256-openai")
CHUNKS_PER_STREAM = STREAM_TOKENS + 2  # role chunk + one per token + the finishing chunk
# LiteLLM refuses to start without a strong master key; every target gets the same header.
BENCH_KEY = "sk-benchmark-6f1c2e9a4b7d4c0e8f3a5b1d9e2c7a40"
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}
# A long stream at an engine's pace (5 ms a token: ~45 KB/s, 20 s): more than the kernel's
# socket buffers hold, read by a client far slower than that.
SLOW_TOKENS, SLOW_PACE_MS = 4096, 5
UPSTREAM_MODELS = [
    "bench-small:16",
    f"bench-stream:{STREAM_TOKENS}",
    f"bench-openai:{STREAM_TOKENS}::openai",
    "bench-paced:50:20",
    "bench-idle:3:60000",
    f"bench-long:{SLOW_TOKENS}:{SLOW_PACE_MS}",
]
BARE, QUICK_START, ALL_METERS = "bare aiohttp", "serve --upstream", "all meters"

# meterproxy with every meter on, its NVML source reading a fake GPU (300 W, a 10 Hz ripple):
# the fake stands in for `pynvml` (nvidia-ml-py) before the proxy imports it.
_FAKE_GPU_SERVE = """
import math, sys, time
from meterproxy.sim.pynvml_fake import FakeNvml
t0 = time.monotonic()
sys.modules["pynvml"] = FakeNvml(
    {"0": lambda t: (t - t0) * 300_000.0 + 2_000.0 * math.sin(62.8 * (t - t0))}
)
from meterproxy.cli import main
sys.exit(main(sys.argv[1:]))
"""
# Limits far above what the benchmark sends: every check runs, none refuses.
_ALL_METERS_CONFIG = """
upstreams:
  - {{name: bench, url: '{upstream}/v1', kind: vllm, gpus: [0]}}
ledger: {{path: '{dir}/usage.db'}}
quota: {{state_path: '{dir}/quota.db', timezone: Europe/Paris}}
tenants:
  bench:
    keys: ['sha256:{digest}']
    limits:
      requests_per_minute: 100000000
      tokens_per_minute: 1000000000000000
      tokens_per_day: 1000000000000000
      usd_per_month: 1000000000
      joules_per_day: 1000000000000
      max_concurrent: 100000
      max_tokens_per_request: 100000
  research:
    keys: ['sha256:{other}']
    models: ['bench-*']
    limits: {{requests_per_minute: 600, tokens_per_day: 5000000}}
energy: {{source: nvml, interval_s: 0.1}}
pricing:
  upstreams:
    bench: {{gpu_hour_usd: 2.5, electricity_usd_per_kwh: 0.12}}
"""


def all_meters_config(work: Path, upstream_url: str) -> Path:
    """The configuration with every meter on, written into `work`."""
    config = work / "all-meters.yaml"
    config.write_text(
        _ALL_METERS_CONFIG.format(
            upstream=upstream_url,
            dir=work,
            digest=hashlib.sha256(BENCH_KEY.encode()).hexdigest(),
            other=hashlib.sha256(b"sk-benchmark-research").hexdigest(),
        )
    )
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def two_cores() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if two_cores() else argv


@dataclass
class Target:
    name: str
    url: str  # the /v1 base
    proc: subprocess.Popen[bytes] | None  # the process whose CPU and memory count
    results: dict[str, dict[str, float]] = field(default_factory=dict)

    def cpu_s(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self, field: str = "VmRSS") -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0


def launch(
    argv: list[str], core: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    # Children run the meterproxy of this tree, whatever is installed.
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        pinned(core, argv),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
        cwd=tempfile.gettempdir(),
    )


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(900):  # LiteLLM takes a while to start
            try:
                async with http.get(url + "/models", headers=AUTH) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wrk(url: str, body_path: str, connections: int, seconds: float) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    return wrk_load.run(pinned(0, argv), url + "/chat/completions", body_path, BENCH_KEY)


_SENT = itertools.count(1)


def _post(http: aiohttp.ClientSession, url: str, body: bytes) -> Any:
    """POST a body as is, except that its placeholder (wrk_load.UNIQUE), if any, gets a number
    of its own: the client-driven measurements send distinct requests too."""
    unique = wrk_load.UNIQUE.encode()
    if unique in body:
        body = body.replace(unique, f"c{next(_SENT)}-{os.getpid()}".encode(), 1)
    return http.post(
        url + "/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", **AUTH},
    )


async def _until(t: float) -> None:
    """Sleep until perf_counter() reaches t: the timer for most of it, then yield to the loop
    (the loop's timers are millisecond-grained; the schedule should not be)."""
    left = t - time.perf_counter()
    if left > 0.003:
        await asyncio.sleep(left - 0.002)
    while time.perf_counter() < t:  # noqa: ASYNC110 (a deliberate sub-millisecond spin)
        await asyncio.sleep(0)


async def open_loop(url: str, rate: float, seconds: float) -> dict[str, float]:
    """Requests sent at fixed times (i / rate), each timed from its scheduled time to its last
    byte: a request that waited behind a stalled one counts the stall (no coordinated
    omission), and the sender never waits for an answer before sending the next."""
    body = orjson.dumps(SCENARIOS["chat"])
    latencies: list[float] = []
    failed = 0

    async def one(http: aiohttp.ClientSession, scheduled: float) -> None:
        nonlocal failed
        async with _post(http, url, body) as r:
            await r.read()
            if r.status != 200:
                failed += 1
        latencies.append((time.perf_counter() - scheduled) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for _ in range(3):  # a warm connection, as a steady client has
            async with _post(http, url, body) as r:
                await r.read()
        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(max(1, int(rate * seconds))):
            scheduled = start + i / rate
            await _until(scheduled)
            tasks.append(asyncio.create_task(one(http, scheduled)))
        await asyncio.gather(*tasks)
    latencies.sort()
    return {
        "count": len(latencies),
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, math.ceil(len(latencies) * 0.99) - 1)],
        "max_ms": latencies[-1],
        "errors": failed,
    }


async def warm_up(url: str) -> None:
    """Every scenario a few times, 4 in flight (some streams left early, as load ends do)."""

    async def one(http: aiohttp.ClientSession, body: bytes, whole: bool) -> None:
        async with _post(http, url, body) as r:
            if whole:
                await r.read()
            else:
                await r.content.readline()

    async with aiohttp.ClientSession() as http:
        for body in SCENARIOS.values():
            raw = orjson.dumps(body)
            for i in range(5):
                await asyncio.gather(*(one(http, raw, i < 4 or j) for j in range(4)))


TTFT_BLOCK = 20  # requests to one target in a row


async def ttft(targets: list[Target], rounds: int) -> None:
    """Time to the first content chunk, one request in flight. In blocks of requests to one
    target, the blocks' order reversed each pass (A B C, C B A, ...) so slow drifts of the
    machine fall on every target alike, and each block's first request left out: it shares
    the core with whatever the target before was still finishing (a stream just read through
    another proxy leaves its settlement, ledger and energy work behind), which measured that
    proxy's leftovers, not this one's time to first token. `rounds` is rounded up to whole
    blocks (30 gives two blocks of 20: 40 samples a target)."""
    body = orjson.dumps(SCENARIOS["stream256"])
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    order, block = list(targets), max(1, min(TTFT_BLOCK, rounds))
    async with aiohttp.ClientSession() as http:
        for _ in range(-(-rounds // block)):
            for t in order:
                for i in range(block + 1):
                    start = time.perf_counter()
                    async with _post(http, t.url, body) as r:
                        async for line in r.content:
                            if b'"content":" ' in line:
                                if i:
                                    samples[t.name].append((time.perf_counter() - start) * 1000)
                                break
                        await r.read()
            order.reverse()
    for t in targets:
        t.results["ttft"] = {"p50_ms": statistics.median(samples[t.name])}


async def jitter(targets: list[Target], streams: int) -> None:
    """64 paced streams (20 ms between tokens): the p99 of gaps between chunk arrivals."""
    body = orjson.dumps({"model": "bench-paced", "messages": MESSAGES, "stream": True})

    async def one(http: aiohttp.ClientSession, url: str, gaps: list[float]) -> None:
        async with _post(http, url, body) as r:
            last = None
            async for line in r.content:
                if b'"content":" ' in line:
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append((now - last) * 1000)
                    last = now

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for t in targets:
            gaps: list[float] = []
            await asyncio.gather(*(one(http, t.url, gaps) for _ in range(streams)))
            gaps.sort()
            t.results["paced"] = {
                "gap_p50_ms": gaps[len(gaps) // 2],
                "gap_p99_ms": gaps[int(len(gaps) * 0.99)],
            }


async def settled_rss_kb(t: Target) -> int:
    """RSS once it stops moving (a process just warmed up may still be freeing or growing)."""
    last = t.rss_kb()
    for _ in range(20):
        await asyncio.sleep(0.25)
        now = t.rss_kb()
        if abs(now - last) < 64:
            return now
        last = now
    return last


async def idle_streams(targets: list[Target], count: int) -> None:
    """Memory per open, idle stream: RSS before and after `count` streams are open."""
    body = orjson.dumps({"model": "bench-idle", "messages": MESSAGES, "stream": True})
    for t in targets:
        if t.proc is None:
            continue
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            before = await settled_rss_kb(t)
            responses = await asyncio.gather(*(_post(http, t.url, body) for _ in range(count)))
            await asyncio.gather(*(r.content.readline() for r in responses))  # all streaming
            await asyncio.sleep(0.5)
            after = t.rss_kb()
            for r in responses:
                r.close()
        t.results["idle"] = {"kb_per_stream": (after - before) / count}


async def slow_streams(targets: list[Target], count: int, seconds: float) -> None:
    """Memory per slowly-read stream: `count` clients each ask for a long stream (~700 KB) and
    read it at a trickle (512 bytes every 0.5 s) through a small receive buffer, so the
    kernel's buffers are soon full and what the proxy holds for each shows in its RSS."""
    body = orjson.dumps({"model": "bench-long", "messages": MESSAGES, "stream": True})
    loop = asyncio.get_running_loop()
    for t in targets:
        if t.proc is None:
            continue
        host, port = t.url.split("//", 1)[1].split("/", 1)[0].split(":")
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {BENCH_KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        before = await settled_rss_kb(t)
        socks = []
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, int(port)))
            await loop.sock_sendall(sock, head + body)
            socks.append(sock)
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            for sock in socks:
                try:
                    sock.recv(512)
                except BlockingIOError:
                    pass
            await asyncio.sleep(0.5)
        after = t.rss_kb()
        for sock in socks:
            sock.close()
        t.results["slow"] = {"kb_per_stream": (after - before) / count}


async def client_measurements(targets: list[Target], args: argparse.Namespace) -> None:
    for t in targets:
        await wait_up(t.url)
    if args.phase == "warm-up":
        for t in targets:
            await warm_up(t.url)
    elif args.phase == "idle":
        await idle_streams(targets, args.idle_streams)
    elif args.phase == "slow":
        await slow_streams(targets, args.slow_streams, args.slow_s)
    elif args.phase == "open-loop":
        for _ in range(args.rounds):  # interleaved, like the closed-loop runs
            for t in targets:
                r = await open_loop(t.url, args.rate, args.open_loop_s)
                acc = t.results.setdefault("open", {"rounds": 0})
                acc["rounds"] += 1
                acc[f"p99_ms_{int(acc['rounds'])}"] = r["p99_ms"]
                acc["max_ms"] = max(acc.get("max_ms", 0.0), r["max_ms"])
                acc["errors"] = acc.get("errors", 0.0) + r["errors"]
                acc.setdefault("p50s", 0.0)
                acc["p50s"] += r["p50_ms"] / args.rounds
                acc.setdefault("p99s", 0.0)
                acc["p99s"] += r["p99_ms"] / args.rounds
    elif args.phase == "clients":
        await ttft(targets, args.ttft_rounds)
        await jitter(targets, 64)


def _f(x: float, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:,.{digits}f}"


def table(targets: list[Target], levels: list[int]) -> str:
    direct, bare = targets[0], targets[1]
    lines = [
        "| scenario | conns | target | req/s | chunks/s | p50 ms | p99 ms | +p50 vs direct ms | "
        "+p99 vs direct ms | CPU µs/req | CPU µs/token | req/s vs bare | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in SCENARIOS:
        stream = scenario in STREAMS
        for level in levels:
            key = f"{scenario}@{level}"
            for t in targets:
                r = t.results.get(key)
                if r is None:
                    continue
                d, b = direct.results[key], bare.results[key]
                chunks = f"{r['rps'] * CHUNKS_PER_STREAM:,.0f}" if stream else "-"
                per_token = _f(r["cpu_us"] / STREAM_TOKENS) if stream else "-"
                lines.append(
                    f"| {scenario} | {level} | {t.name} | {r['rps']:,.0f} | {chunks} | "
                    f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p50_ms'] - d['p50_ms']:+.2f} | "
                    f"{r['p99_ms'] - d['p99_ms']:+.2f} | {r['cpu_us']:,.0f} | {per_token} | "
                    f"{r['rps'] / b['rps']:.2f} | {r['errors']:.0f} |"
                )
    lines += [
        "",
        "| target | open loop p50 ms | p99 ms (mean of rounds) | p99 by round | max ms | errors | "
        "TTFT p50 ms | +TTFT vs direct ms | paced gap p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        o = t.results.get("open", {})
        rounds = int(o.get("rounds", 0))
        by_round = " / ".join(_f(o[f"p99_ms_{i}"]) for i in range(1, rounds + 1))
        lines.append(
            f"| {t.name} | {_f(o.get('p50s', math.nan))} | {_f(o.get('p99s', math.nan))} | "
            f"{by_round or '-'} | {_f(o.get('max_ms', math.nan))} | {o.get('errors', 0):.0f} | "
            f"{t.results['ttft']['p50_ms']:.2f} | "
            f"{t.results['ttft']['p50_ms'] - direct.results['ttft']['p50_ms']:+.2f} | "
            f"{t.results['paced']['gap_p50_ms']:.2f} / {t.results['paced']['gap_p99_ms']:.2f} |"
        )
    lines += [
        "",
        "| target | RSS at rest MiB | RSS at rest after the load MiB | peak RSS MiB | "
        "KiB per idle stream | KiB per slowly-read stream |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets[1:]:
        m = t.results.get("memory", {})
        lines.append(
            f"| {t.name} | {_f(m.get('rest_mib', math.nan), 1)} | "
            f"{_f(m.get('after_mib', math.nan), 1)} | {_f(m.get('peak_mib', math.nan), 1)} | "
            f"{_f(t.results.get('idle', {}).get('kb_per_stream', math.nan), 1)} | "
            f"{_f(t.results.get('slow', {}).get('kb_per_stream', math.nan), 1)} |"
        )
    return "\n".join(lines)


def summary(targets: list[Target], levels: list[int]) -> str:
    """The issue's view: each proxy against the bare floor, and the targets for all meters."""
    direct, bare = targets[0], targets[1]
    wide = [lv for lv in levels if lv >= 16]
    mid = 16 if 16 in levels else levels[-1]
    lines = [
        "| target | added p50 / p99 at 1 in flight ms | chat req/s at "
        + " / ".join(str(lv) for lv in wide or levels)
        + " conns (x bare) | CPU µs per request | CPU µs per streamed token, vLLM / OpenAI "
        "bytes | open loop p99 / max ms | RSS at rest MiB | KiB per idle / slow stream |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in targets[1:]:
        r = t.results
        one = r.get("chat@1")
        added = (
            f"+{one['p50_ms'] - direct.results['chat@1']['p50_ms']:.2f} / "
            f"+{one['p99_ms'] - direct.results['chat@1']['p99_ms']:.2f}"
            if one
            else "-"
        )
        rps = " / ".join(
            f"{r[f'chat@{lv}']['rps']:,.0f} "
            f"({r[f'chat@{lv}']['rps'] / bare.results[f'chat@{lv}']['rps']:.2f}x)"
            for lv in wide or levels
        )
        tokens = " / ".join(f"{r[f'{s}@{mid}']['cpu_us'] / STREAM_TOKENS:.1f}" for s in STREAMS)
        o, m = r.get("open", {}), r.get("memory", {})
        lines.append(
            f"| {t.name} | {added} | {rps} | {r[f'chat@{mid}']['cpu_us']:,.0f} | {tokens} | "
            f"{_f(o.get('p99s', math.nan))} / {_f(o.get('max_ms', math.nan))} | "
            f"{_f(m.get('rest_mib', math.nan), 1)} "
            f"(after load {_f(m.get('after_mib', math.nan), 1)}) | "
            f"{_f(r.get('idle', {}).get('kb_per_stream', math.nan), 1)} / "
            f"{_f(r.get('slow', {}).get('kb_per_stream', math.nan), 1)} |"
        )
    meter = next((t for t in targets if t.name == ALL_METERS), None)
    if meter is None:
        return "\n".join(lines)
    r, b = meter.results, bare.results
    checks = []
    for lv in wide:
        ratio = r[f"chat@{lv}"]["rps"] / b[f"chat@{lv}"]["rps"]
        checks.append((f"req/s at {lv} connections >= 0.9x bare", f"{ratio:.2f}x", ratio >= 0.9))
    if "chat@1" in r:
        added = r["chat@1"]["p99_ms"] - direct.results["chat@1"]["p99_ms"]
        checks.append(("added p99 at one in flight <= 1.0 ms", f"{added:+.2f} ms", added <= 1.0))
    if "open" in r and "open" in b:
        p99, floor = r["open"]["p99s"], b["open"]["p99s"]
        checks.append(
            (
                "open-loop p99 within 2x the floor's",
                f"{p99:.2f} vs {floor:.2f} ms ({p99 / floor:.2f}x)",
                p99 <= 2 * floor,
            )
        )
        worst = r["open"]["max_ms"]
        checks.append(("no open-loop request above 50 ms", f"max {worst:.2f} ms", worst <= 50))
    for s in STREAMS:
        ratio = r[f"{s}@{mid}"]["cpu_us"] / b[f"{s}@{mid}"]["cpu_us"]
        checks.append((f"CPU per streamed token ({s}) <= 1.25x", f"{ratio:.2f}x", ratio <= 1.25))
    mem = r.get("memory", {})
    for key, what in (("rest_mib", "at rest"), ("after_mib", "at rest after the load")):
        if key in mem:
            checks.append((f"RSS {what} < 80 MiB", f"{mem[key]:.1f} MiB", mem[key] < 80))
    for key, what in (("idle", "idle"), ("slow", "slowly-read")):
        if key in r:
            kb = r[key]["kb_per_stream"]
            checks.append((f"< 16 KiB per {what} stream", f"{kb:.1f} KiB", kb < 16))
    lines += ["", f"| target ({ALL_METERS} vs {BARE}) | measured | met |", "|---|---|---|"]
    lines += [f"| {what} | {got} | {'yes' if ok else '**no**'} |" for what, got, ok in checks]
    return "\n".join(lines)


def soak(target: Target, body_path: str, seconds: float) -> str:
    """Constant streaming load on one target; resident memory sampled every 10 s."""
    samples = [target.rss_kb() / 1024]
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        wrk(target.url, body_path, 16, min(10, max(1, t_end - time.monotonic())))
        samples.append(target.rss_kb() / 1024)
    return (
        f"soak: {seconds:.0f} s of 16 concurrent 256-token streams through {target.name}: "
        f"RSS {samples[0]:.1f} MiB at start, {samples[-1]:.1f} MiB at the end, "
        f"{max(samples):.1f} MiB at most; samples every 10 s: "
        + ", ".join(f"{s:.0f}" for s in samples)
    )


def start_targets(args: argparse.Namespace, work: Path) -> tuple[list[Target], list[Target]]:
    """(every target, the meterproxy ones): processes started, not yet up."""
    py = sys.executable
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    models = [a for m in UPSTREAM_MODELS for a in ("--model", m)]
    upstream = launch([py, "-m", "meterproxy.sim.upstream", "--port", str(up_port), *models], 0)
    targets = [Target("direct", upstream_url + "/v1", upstream)]

    def add(name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> Target:
        targets.append(Target(name, f"http://127.0.0.1:{port}/v1", launch(argv, 1, env)))
        return targets[-1]

    port = free_port()
    add(BARE, [py, str(ROOT / "benchmarks" / "bare_proxy.py"), "--upstream", upstream_url,
               "--port", str(port)], port)  # fmt: skip
    serve = ["serve", "--log-level", "WARNING"]
    port = free_port()
    quick = add(
        QUICK_START,
        [py, "-m", "meterproxy", *serve, "--upstream", upstream_url + "/v1", "--port", str(port),
         "--data-dir", str(work / "quick")],
        port,
    )  # fmt: skip
    config = all_meters_config(work, upstream_url)
    port = free_port()
    argv = [*serve, "--config", str(config), "--port", str(port)]
    meters = add(ALL_METERS, [py, "-c", _FAKE_GPU_SERVE, *argv], port)
    metered = [quick, meters]
    if args.metering_off:
        port = free_port()
        off = [*argv[:-1], str(port), "--benchmark-no-metering"]
        metered.append(add("metering off", [py, "-c", _FAKE_GPU_SERVE, *off], port))
    if args.litellm:
        port = free_port()
        cfg = work / "litellm.yaml"
        cfg.write_text(
            "model_list:\n"
            + "".join(
                f"  - model_name: {m.split(':')[0]}\n    litellm_params: {{model: "
                f"openai/{m.split(':')[0]}, api_base: '{upstream_url}/v1', api_key: x}}\n"
                for m in UPSTREAM_MODELS
            )
        )
        add(
            "LiteLLM",
            [args.litellm, "--config", str(cfg), "--port", str(port), "--num_workers", "1"],
            port,
            {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": BENCH_KEY},
        )
    return targets, metered


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextlib.contextmanager
def running(args: argparse.Namespace, work: Path) -> Iterator[list[Target]]:
    """Every target started afresh, up and warmed up (connections, code paths, the token
    encoding a stream left early loads); stopped at the end."""
    work.mkdir(parents=True)
    targets, _ = start_targets(args, work)
    try:
        args.phase = "warm-up"
        asyncio.run(client_measurements(targets, args))
        time.sleep(1.0)
        yield targets
    finally:
        for t in targets:
            if t.proc is not None:
                t.proc.send_signal(signal.SIGTERM)
        for t in targets:
            if t.proc is not None:
                try:
                    t.proc.wait(10)
                except subprocess.TimeoutExpired:
                    t.proc.kill()


def run(args: argparse.Namespace) -> str:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the load: apt-get install -y wrk")
    if two_cores():  # this script's own clients share core 0 with the upstream and wrk
        os.sched_setaffinity(0, {0})
    load_before = loadavg()
    work = Path(tempfile.mkdtemp(prefix="meterproxy-bench-"))
    memory: dict[str, dict[str, float]] = {}
    try:
        # Memory first, each figure from processes started for it: one that has carried load
        # has free heap that new streams reuse, and would hide what they cost.
        for phase in ("idle", "slow"):
            with running(args, work / phase) as targets:
                proxies = [t for t in targets[1:] if t.name != "LiteLLM"]
                for t in targets[1:]:
                    memory.setdefault(t.name, {}).setdefault("rest_mib", t.rss_kb() / 1024)
                args.phase = phase
                asyncio.run(client_measurements(proxies, args))
                for t in proxies:
                    memory[t.name][phase] = t.results[phase]["kb_per_stream"]
            print(f"  done: memory per {phase} stream", file=sys.stderr)
        with running(args, work / "load") as targets:
            bodies = {}
            for name, body in SCENARIOS.items():
                path = work / f"{name}.json"
                path.write_bytes(orjson.dumps(body))
                bodies[name] = str(path)
            if args.soak:
                meters = next(t for t in targets if t.name == ALL_METERS)
                return soak(meters, bodies["stream256"], args.soak)
            for scenario, body_path in bodies.items():
                for level in args.levels:
                    for _ in range(args.rounds):  # A, B, C, ... A, B, C: drift cancels
                        for t in targets:
                            cpu0 = t.cpu_s()
                            r = wrk(t.url, body_path, level, args.duration)
                            r["cpu_us"] = (t.cpu_s() - cpu0) / max(r["requests"], 1) * 1e6
                            acc = t.results.setdefault(f"{scenario}@{level}", {})
                            for k, v in r.items():
                                acc[k] = acc.get(k, 0.0) + v / args.rounds
                    print(f"  done: {scenario} at {level} connections", file=sys.stderr)
            args.phase = "open-loop"
            asyncio.run(client_measurements(targets, args))
            print("  done: open loop", file=sys.stderr)
            args.phase = "clients"
            asyncio.run(client_measurements(targets, args))
            time.sleep(2.0)
            for t in targets[1:]:
                m = memory.setdefault(t.name, {})
                m["after_mib"] = t.rss_kb() / 1024
                m["peak_mib"] = t.rss_kb("VmHWM") / 1024
                t.results["memory"] = m
                for phase in ("idle", "slow"):
                    if phase in m:
                        t.results[phase] = {"kb_per_stream": m[phase]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    header = (
        f"machine: {os.cpu_count()} cores, {cpu}; Python {sys.version.split()[0]}; "
        f"{args.duration}s per run x {args.rounds} rounds; open loop {args.rate:g} req/s for "
        f"{args.open_loop_s:g} s x {args.rounds} rounds; load average (1/5/15 min) "
        f"{load_before} before, {loadavg()} after"
    )
    return "\n\n".join([header, summary(targets, args.levels), table(targets, args.levels)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per run, levels 1 and 16")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument(
        "--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256]
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=50.0, help="open loop: requests per second")
    parser.add_argument("--open-loop-s", type=float, default=10.0, help="open loop: seconds")
    parser.add_argument("--ttft-rounds", type=int, default=200)
    parser.add_argument("--idle-streams", type=int, default=1000)
    parser.add_argument("--slow-streams", type=int, default=200)
    parser.add_argument("--slow-s", type=float, default=4.0, help="how long slow streams trickle")
    parser.add_argument("--metering-off", action="store_true", help="add the metering-off run")
    parser.add_argument("--litellm", help="path to a `litellm` executable to compare with")
    parser.add_argument(
        "--soak",
        type=float,
        default=0.0,
        help="instead: SECONDS of constant load on the last meterproxy, memory sampled",
    )
    args = parser.parse_args()
    if args.quick:  # a smoke run: explicit --duration/--levels/... still win
        defaults = parser.parse_args([])
        for name, quick in (
            ("duration", 2.0),
            ("levels", [1, 16]),
            ("rounds", 1),
            ("open_loop_s", 2.0),
            ("ttft_rounds", 20),
            ("idle_streams", 100),
            ("slow_streams", 20),
            ("slow_s", 1.5),
        ):
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, quick)
    print(run(args))


if __name__ == "__main__":
    main()
