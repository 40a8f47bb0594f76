"""What the proxy costs, measured against a direct connection in the same run.

    python benchmarks/overhead.py                # the full run (about 4 minutes)
    python benchmarks/overhead.py --quick        # a 2-second-per-level smoke run
    python benchmarks/overhead.py --litellm /path/to/venv/bin/litellm   # add LiteLLM

Starts a fast simulated vLLM upstream (one token per chunk, no think time), the bare aiohttp
pass-through (benchmarks/bare_proxy.py, the floor for this stack), meterproxy with metering on,
and meterproxy with metering off (a benchmark-only switch); the upstream and the load generator
share core 0 and each proxy runs alone on core 1 (taskset, where the machine has two cores).
Scenarios run interleaved per level (direct, bare, meterproxy, ... then again), so drift cancels.
Load comes from wrk (Debian package `wrk`) for throughput and latency, and from an aiohttp client
for time to first token, inter-token jitter and memory per open stream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Benchmark the proxy, please."}]
SCENARIOS = {
    "chat": {"model": "bench-small", "messages": MESSAGES},
    "stream256": {"model": "bench-stream", "messages": MESSAGES, "stream": True},
    "prompt100k": {
        "model": "bench-small",
        "messages": [{"role": "user", "content": "lorem ipsum " * 8533}],
    },
}
# LiteLLM refuses to start without a strong master key; every target gets the same header.
BENCH_KEY = "sk-benchmark-6f1c2e9a4b7d4c0e8f3a5b1d9e2c7a40"
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}
UPSTREAM_MODELS = ["bench-small:16", "bench-stream:256", "bench-paced:50:20", "bench-idle:3:60000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(core), *argv]
    return argv


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
    return subprocess.Popen(
        pinned(core, argv),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
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


_WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
f:close()
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, body_path: str, connections: int, seconds: float) -> dict[str, float]:
    script = Path(tempfile.gettempdir()) / "meterproxy-bench.lua"
    script.write_text(_WRK_SCRIPT)
    out = subprocess.run(
        pinned(
            0,
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{round(seconds)}s",
                "--latency",
                "-s",
                str(script),
                url + "/chat/completions",
            ],
        ),
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_BODY": body_path, "BENCH_KEY": BENCH_KEY},
        check=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        result[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


async def ttft(targets: list[Target], rounds: int) -> None:
    """Time to the first content chunk, one request in flight, interleaved across targets."""
    body = orjson.dumps(SCENARIOS["stream256"])
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    async with aiohttp.ClientSession() as http:
        for _ in range(rounds):
            for t in targets:
                start = time.perf_counter()
                async with http.post(
                    t.url + "/chat/completions",
                    data=body,
                    headers={"Content-Type": "application/json", **AUTH},
                ) as r:
                    async for line in r.content:
                        if b'"content":" ' in line:
                            samples[t.name].append((time.perf_counter() - start) * 1000)
                            break
                    await r.read()
    for t in targets:
        t.results["ttft"] = {"p50_ms": statistics.median(samples[t.name])}


async def jitter(targets: list[Target], streams: int) -> None:
    """64 paced streams (20 ms between tokens): the p99 of gaps between chunk arrivals."""
    body = orjson.dumps({"model": "bench-paced", "messages": MESSAGES, "stream": True})

    async def one(http: aiohttp.ClientSession, url: str, gaps: list[float]) -> None:
        async with http.post(
            url + "/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", **AUTH},
        ) as r:
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


async def idle_streams(targets: list[Target], count: int) -> None:
    """Memory per open, idle stream: RSS before and after `count` streams are open."""
    body = orjson.dumps({"model": "bench-idle", "messages": MESSAGES, "stream": True})
    for t in targets:
        if t.proc is None:
            continue
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await asyncio.sleep(0.5)
            before = t.rss_kb()
            responses = await asyncio.gather(
                *(
                    http.post(
                        t.url + "/chat/completions",
                        data=body,
                        headers={"Content-Type": "application/json", **AUTH},
                    )
                    for _ in range(count)
                )
            )
            await asyncio.gather(*(r.content.readline() for r in responses))  # all streaming
            await asyncio.sleep(0.5)
            after = t.rss_kb()
            for r in responses:
                r.close()
        t.results["idle"] = {
            "kb_per_stream": (after - before) / count,
            "peak_mib": t.rss_kb("VmHWM") / 1024,
        }


CHUNKS_PER_STREAM = 258  # role chunk + 256 tokens + [DONE]


def table(targets: list[Target], levels: list[int]) -> str:
    direct, bare = targets[0], targets[1]
    lines = [
        "| scenario | conns | target | req/s | chunks/s | p50 ms | p99 ms | "
        "+p50 vs direct ms | CPU µs/req | req/s vs direct | req/s vs bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in SCENARIOS:

        def chunks(r: dict[str, float], scenario: str = scenario) -> str:
            return f"{r['rps'] * CHUNKS_PER_STREAM:,.0f}" if scenario == "stream256" else "-"

        for level in levels:
            key = f"{scenario}@{level}"
            for t in targets:
                r = t.results.get(key)
                if r is None:
                    continue
                d, b = direct.results[key], bare.results[key]
                lines.append(
                    f"| {scenario} | {level} | {t.name} | {r['rps']:,.0f} | {chunks(r)} | "
                    f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p50_ms'] - d['p50_ms']:+.2f} | "
                    f"{r['cpu_us']:,.0f} | {r['rps'] / d['rps']:.2f} | {r['rps'] / b['rps']:.2f} |"
                )
    lines += [
        "",
        "| target | TTFT p50 ms | +TTFT vs direct ms | paced gap p50 ms | "
        "paced gap p99 ms | RSS at rest MiB | peak RSS MiB | KB per idle stream |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        idle = t.results.get("idle", {})
        lines.append(
            f"| {t.name} | {t.results['ttft']['p50_ms']:.2f} | "
            f"{t.results['ttft']['p50_ms'] - direct.results['ttft']['p50_ms']:+.2f} | "
            f"{t.results['paced']['gap_p50_ms']:.2f} | {t.results['paced']['gap_p99_ms']:.2f} | "
            f"{t.results.get('memory', {}).get('rest_mib', float('nan')):.1f} | "
            f"{idle.get('peak_mib', float('nan')):.1f} | "
            f"{idle.get('kb_per_stream', float('nan')):.1f} |"
        )
    return "\n".join(lines)


async def client_measurements(targets: list[Target], args: argparse.Namespace) -> None:
    for t in targets:
        await wait_up(t.url)
    if args.phase == "clients":
        await ttft(targets, args.ttft_rounds)
        await jitter(targets, 64)
        await idle_streams(targets[1:], args.idle_streams)


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


def run(args: argparse.Namespace) -> str:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the load: apt-get install -y wrk")
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    procs: list[subprocess.Popen[bytes]] = []
    py = sys.executable
    models = [a for m in UPSTREAM_MODELS for a in ("--model", m)]
    upstream = launch([py, "-m", "meterproxy.sim.upstream", "--port", str(up_port), *models], 0)
    procs.append(upstream)
    targets = [Target("direct", upstream_url + "/v1", upstream)]
    bare_port = free_port()
    procs.append(
        launch(
            [
                py,
                str(ROOT / "benchmarks" / "bare_proxy.py"),
                "--upstream",
                upstream_url,
                "--port",
                str(bare_port),
            ],
            1,
        )
    )
    targets.append(Target("bare aiohttp", f"http://127.0.0.1:{bare_port}/v1", procs[-1]))
    config = Path(tempfile.mkdtemp()) / "meterproxy.yaml"
    config.write_text(
        f"upstreams: [{{name: bench, url: '{upstream_url}/v1', kind: vllm}}]\n"
        f"ledger: {{path: '{config.parent / 'usage.db'}'}}\n"
        f"quota: {{state_path: '{config.parent / 'quota.db'}'}}\n"
    )
    for name, extra in (
        ("meterproxy", []),
        ("meterproxy, metering off", ["--benchmark-no-metering"]),
    ):
        port = free_port()
        procs.append(
            launch(
                [
                    py,
                    "-m",
                    "meterproxy",
                    "serve",
                    "--config",
                    str(config),
                    "--port",
                    str(port),
                    "--log-level",
                    "WARNING",
                    *extra,
                ],
                1,
            )
        )
        targets.append(Target(name, f"http://127.0.0.1:{port}/v1", procs[-1]))
    if args.litellm:
        port = free_port()
        cfg = config.parent / "litellm.yaml"
        cfg.write_text(
            "model_list:\n"
            + "".join(
                f"  - model_name: {m.split(':')[0]}\n    litellm_params: {{model: "
                f"openai/{m.split(':')[0]}, api_base: '{upstream_url}/v1', api_key: x}}\n"
                for m in UPSTREAM_MODELS
            )
        )
        procs.append(
            launch(
                [args.litellm, "--config", str(cfg), "--port", str(port), "--num_workers", "1"],
                1,
                {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": BENCH_KEY},
            )
        )
        targets.append(Target("LiteLLM", f"http://127.0.0.1:{port}/v1", procs[-1]))
    try:
        args.phase = "wait"
        asyncio.run(client_measurements(targets, args))
        bodies = {}
        for name, body in SCENARIOS.items():
            path = config.parent / f"{name}.json"
            path.write_bytes(orjson.dumps(body))
            bodies[name] = str(path)
        for t in targets:  # warm up connections and code paths; then memory at rest
            wrk(t.url, bodies["chat"], 4, 1)
            if t.proc is not None:
                t.results["memory"] = {"rest_mib": t.rss_kb() / 1024}
        for scenario, body_path in bodies.items():
            if args.soak:
                break
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
        if args.soak:
            return soak(targets[2], bodies["stream256"], args.soak)
        args.phase = "clients"
        asyncio.run(client_measurements(targets, args))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
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
        f"{args.duration}s per run x {args.rounds} rounds"
    )
    return header + "\n\n" + table(targets, args.levels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per run, levels 1 and 16")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument(
        "--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256]
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ttft-rounds", type=int, default=200)
    parser.add_argument("--idle-streams", type=int, default=1000)
    parser.add_argument("--litellm", help="path to a `litellm` executable to compare with")
    parser.add_argument(
        "--soak",
        type=float,
        default=0.0,
        help="instead: SECONDS of constant load on meterproxy, memory sampled",
    )
    args = parser.parse_args()
    if args.quick:  # a smoke run: explicit --duration/--levels/... still win
        defaults = parser.parse_args([])
        for name, quick in (
            ("duration", 2.0),
            ("levels", [1, 16]),
            ("rounds", 1),
            ("ttft_rounds", 20),
            ("idle_streams", 100),
        ):
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, quick)
    print(run(args))


if __name__ == "__main__":
    main()
