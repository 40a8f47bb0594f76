"""What scaling out costs and buys: admission latency added by Redis, and throughput with
`--workers 2` against one worker on the same two cores.

    python benchmarks/scale.py admission        # quota.admit: in-process vs Redis, p50/p99
    python benchmarks/scale.py workers          # c32 through 1 and 2 workers on 2 cores
    python benchmarks/scale.py all --quick      # both, short

`admission` starts a redis-server (no persistence) and times admit + settle of one tenant with
per-minute and daily limits, one request in flight and 32 at once, through the in-process
backend and the Redis backend; then the same through the whole proxy (wrk, one connection):
a single meterproxy process with `quota.backend: local` and one with `redis`.

`workers` pins meterproxy (the supervisor and every process it starts) to two cores
(`--proxy-cpus`, default the first two) and gives the simulated upstreams (several processes on
one port) and wrk the other cores (`--load-cpus`); on a machine with only two cores they share
them, and the ratio says little. Each round runs 1 worker then 2 workers, wrk -c32, non-streamed
chat with a tenant key (a tenant with limits: the host process's local quota, or Redis).
Needs `wrk` and `redis-server` (Debian packages).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import wrk_load  # beside this script: the benchmarks' shared wrk driver

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from meterproxy.policy import Limits, Tenancy, Tenant  # noqa: E402
from meterproxy.usage import Source, Usage  # noqa: E402

KEY = "bench-tenant-key-0123456789"
# Each request distinct (wrk_load.UNIQUE): not a workload of repeats only.
BODY = {
    "model": "bench-small",
    "messages": [{"role": "user", "content": "Benchmark, please. (__N__)"}],
}
LIMITS = Limits(
    requests_per_minute=10**9, tokens_per_minute=10**12, tokens_per_day=10**15, max_concurrent=10**6
)
UPSTREAM = """
import sys
from aiohttp import web
import uvloop
from meterproxy.sim.upstream import Behavior, FakeUpstream
uvloop.install()
app = FakeUpstream("vllm", {"bench-small": Behavior(tokens=16)}, keep_seen=False).app()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), reuse_port=True,
            handler_cancellation=True, access_log=None, print=None)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus and shutil.which("taskset") else argv


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is needed: apt-get install -y redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


# -- admission latency, in process ------------------------------------------------------------


async def time_admissions(backend: object, n: int, concurrency: int) -> tuple[list[float], float]:
    tenant = Tenant("bench", limits=LIMITS)
    samples: list[float] = []
    counter = iter(range(10**9))

    async def loop() -> None:
        for _ in range(n // concurrency):
            key = f"bench-{next(counter)}"
            t0 = time.perf_counter()
            ticket = await backend.admit(tenant, 100, key, capped=True)  # type: ignore[attr-defined]
            samples.append((time.perf_counter() - t0) * 1e6)
            backend.settle(_settlement(key, ticket))  # type: ignore[attr-defined]

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return samples, len(samples) / (time.perf_counter() - t0)


def _settlement(key: str, ticket: object) -> object:
    from meterproxy.exchange import Outcome
    from meterproxy.settlement import Settlement

    return Settlement(
        request_id=key,
        endpoint="chat_completions",
        tenant="bench",
        model="bench-small",
        upstream="bench",
        status="200",
        outcome=Outcome.SUCCESS,
        usage=Usage(60, 40, None, None, Source.UPSTREAM),
        estimated=False,
        streamed=False,
        started_ns=0,
        first_token_ns=None,
        ended_ns=1,
        ts=time.time(),
        reached_upstream=True,
        waste_reason=None,
        upstream_error=None,
        client_request_id=None,
        upstream_request_id=None,
        client_user=None,
        gpu_seconds=0.0,
        energy_j=None,
        cost_usd=0.0,
        priced=True,
        ticket=ticket,  # type: ignore[arg-type]
    )


async def admission_in_process(redis_url: str, n: int) -> list[str]:
    from prometheus_client import CollectorRegistry

    from meterproxy.metrics import Metrics
    from meterproxy.quota_local import LocalQuota
    from meterproxy.quota_redis import RedisQuota
    from meterproxy.quota_settings import QuotaBackendSettings

    tenancy = Tenancy(tenants={"bench": Tenant("bench", limits=LIMITS)}, state_path=":memory:")
    rows = []
    for name in ("in-process", "redis"):
        metrics = Metrics(CollectorRegistry())
        if name == "redis":
            settings = QuotaBackendSettings(backend="redis", redis_url=redis_url, timeout_s=1.0)
            backend: object = RedisQuota(settings, tenancy, metrics, None, time.time)
        else:
            backend = LocalQuota(tenancy, metrics, time.monotonic_ns, time.time)
        await backend.open()  # type: ignore[attr-defined]
        task = asyncio.create_task(backend.run())  # type: ignore[attr-defined]
        await time_admissions(backend, 200, 1)  # warm up (and the first rebuild)
        for concurrency in (1, 32):
            samples, rate = await time_admissions(backend, n, concurrency)
            rows.append(
                f"| {name} | {concurrency} | {statistics.median(samples):,.0f} | "
                f"{pct(samples, 0.99):,.0f} | {rate:,.0f} |"
            )
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await backend.close()  # type: ignore[attr-defined]
    return [
        "| quota backend | in flight | admit p50 µs | admit p99 µs | admissions/s |",
        "|---|---|---|---|---|",
        *rows,
    ]


# -- through the proxy ---------------------------------------------------------------------------


def wrk(
    url: str, connections: int, seconds: float, cpus: str | None, threads: int
) -> dict[str, float]:
    body = Path(tempfile.gettempdir()) / "meterproxy-scale.json"
    body.write_bytes(orjson.dumps(BODY))
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{round(seconds)}s", "--latency"]
    return wrk_load.run(pinned(cpus, argv), url + "/v1/chat/completions", body, KEY)


def write_config(workdir: Path, upstream_port: int, quota: str, redis_url: str | None) -> Path:
    lines = [
        f"upstreams: [{{name: bench, url: 'http://127.0.0.1:{upstream_port}/v1', kind: vllm}}]",
        "server: {unready_delay_s: 0, drain_timeout_s: 5}",
        f"ledger: {{path: '{workdir / 'usage.db'}'}}",
    ]
    if quota == "none":  # no tenants, no limits: no admission at all
        path = workdir / "meterproxy-none.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path
    lines += [
        "tenants:",
        "  bench:",
        "    keys: ['env:BENCH_KEY']",
        "    limits: {requests_per_minute: 1000000000, tokens_per_minute: 1000000000000,"
        " tokens_per_day: 1000000000000000, max_concurrent: 1000000}",
    ]
    quota_line = f"quota: {{state_path: '{workdir / 'quota.db'}'"
    if quota == "redis":
        quota_line += f", backend: redis, redis_url: '{redis_url}', timeout_s: 1"
    lines.append(quota_line + "}")
    path = workdir / f"meterproxy-{quota}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def wait_up(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(
                    url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                ) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants, from /proc."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, total, grew = {root}, 0.0, True
    while grew:
        before = len(tree)
        tree |= {pid for pid, (parent, _) in stats.items() if parent in tree}
        grew = len(tree) > before
    for pid in tree:
        total += stats.get(pid, (0, 0.0))[1]
    return total


class Proxy:
    def __init__(self, config: Path, workers: int, cpus: str | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            pinned(
                cpus,
                [
                    sys.executable,
                    "-m",
                    "meterproxy",
                    "serve",
                    "--config",
                    str(config),
                    "--port",
                    str(self.port),
                    "--workers",
                    str(workers),
                    "--log-level",
                    "WARNING",
                ],
            ),
            env={**os.environ, "BENCH_KEY": KEY, "PYTHONPATH": str(ROOT / "src")},
            cwd=config.parent,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# A vLLM chat completion, as nginx serves it for the `--upstream nginx` runs: an upstream that
# costs a few percent of a core, so that on two cores the proxy's workers get nearly all of it.
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1764460800,
    "model": "bench-small",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " the quick brown fox" * 4},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ],
    "usage": {"prompt_tokens": 9, "total_tokens": 25, "completion_tokens": 16},
}
MODELS = {"object": "list", "data": [{"id": "bench-small", "object": "model", "owned_by": "vllm"}]}
NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_buffer_size 64k;
  default_type application/json;
  server {{
    listen 127.0.0.1:{port};
    location = /v1/models {{ return 200 '{models}'; }}
    location / {{ return 200 '{completion}'; }}
  }}
}}
"""


def start_nginx(workdir: Path, cpus: str | None) -> tuple[list[subprocess.Popen[bytes]], int]:
    if shutil.which("nginx") is None:
        raise SystemExit("--upstream nginx needs nginx: apt-get install -y nginx-light")
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        NGINX.format(
            dir=workdir,
            port=port,
            models=orjson.dumps(MODELS).decode(),
            completion=orjson.dumps(COMPLETION).decode(),
        )
    )
    argv = ["nginx", "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"]
    return [subprocess.Popen(pinned(cpus, argv))], port


def start_upstreams(count: int, cpus: str | None) -> tuple[list[subprocess.Popen[bytes]], int]:
    port = free_port()
    procs = [
        subprocess.Popen(
            pinned(cpus, [sys.executable, "-c", UPSTREAM, str(port)]),
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    return procs, port


def proxy_latency(
    workdir: Path,
    upstream_port: int,
    redis_url: str,
    seconds: float,
    load_cpus: str | None,
    proxy_cpus: str | None,
) -> list[str]:
    """One connection through a single meterproxy process: local quota vs Redis."""
    rows = []
    results: dict[str, list[dict[str, float]]] = {"local": [], "redis": []}
    proxies = {
        q: Proxy(write_config(workdir, upstream_port, q, redis_url), 1, proxy_cpus) for q in results
    }
    try:
        for p in proxies.values():
            asyncio.run(wait_up(p.url))
            wrk(p.url, 1, 1, load_cpus, 1)  # warm up
        for _ in range(2):
            for q, p in proxies.items():
                results[q].append(wrk(p.url, 1, seconds, load_cpus, 1))
    finally:
        for p in proxies.values():
            p.stop()
    base = {k: statistics.mean(r[k] for r in results["local"]) for k in ("p50_ms", "p99_ms")}
    for q, runs in results.items():
        p50 = statistics.mean(r["p50_ms"] for r in runs)
        p99 = statistics.mean(r["p99_ms"] for r in runs)
        rows.append(
            f"| {q} | {statistics.mean(r['rps'] for r in runs):,.0f} | {p50:.3f} | {p99:.3f} | "
            f"{p50 - base['p50_ms']:+.3f} | {p99 - base['p99_ms']:+.3f} |"
        )
    return [
        "| quota.backend (1 process, 1 connection) | req/s | p50 ms | p99 ms | +p50 vs local ms | "
        "+p99 vs local ms |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def workers_throughput(
    workdir: Path, upstream_port: int, redis_url: str, args: argparse.Namespace
) -> list[str]:
    upstream = "nginx" if args.upstream == "nginx" else f"{args.upstreams} simulated vLLM"
    rows = []
    for quota in args.quota:
        config = write_config(workdir, upstream_port, quota, redis_url)
        runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for workers in (1, 2):
                proxy = Proxy(config, workers, args.proxy_cpus)
                try:
                    asyncio.run(wait_up(proxy.url))
                    time.sleep(1.0 if workers > 1 else 0.2)  # every worker listening
                    wrk(proxy.url, 32, 1, args.load_cpus, args.wrk_threads)  # warm up
                    cpu0 = tree_cpu_s(proxy.proc.pid)
                    result = wrk(proxy.url, 32, args.duration, args.load_cpus, args.wrk_threads)
                    served = result["rps"] * args.duration
                    result["cpu_us"] = (tree_cpu_s(proxy.proc.pid) - cpu0) / served * 1e6
                    runs[workers].append(result)
                finally:
                    proxy.stop()
        one = statistics.mean(r["rps"] for r in runs[1])
        cpu_one = statistics.mean(r["cpu_us"] for r in runs[1])
        for workers, results in runs.items():
            rps = statistics.mean(r["rps"] for r in results)
            cpu = statistics.mean(r["cpu_us"] for r in results)
            # Where the two cores are the proxy's alone, N workers can serve N cores' worth
            # of its CPU per request: the projection removes the cores the load took.
            projected = workers * cpu_one / cpu
            rows.append(
                f"| {quota} | {workers} | {rps:,.0f} | "
                f"{statistics.mean(r['p50_ms'] for r in results):.2f} | "
                f"{statistics.mean(r['p99_ms'] for r in results):.2f} | {rps / one:.2f}x | "
                f"{cpu:,.0f} | {projected:.2f}x | {int(sum(r['errors'] for r in results))} |"
            )
    return [
        f"c32, non-streamed chat, proxy on CPUs {args.proxy_cpus}; upstream ({upstream}) and "
        f"wrk (-t{args.wrk_threads}) on CPUs {args.load_cpus}; "
        f"{args.duration:g} s x {args.rounds} rounds",
        "",
        "| quota.backend | workers | req/s | p50 ms | p99 ms | vs 1 worker | "
        "proxy CPU µs/req (all its processes) | on dedicated cores, vs 1 worker | non-2xx |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def main() -> None:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("admission", "workers", "all"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--admissions", type=int, default=20_000)
    parser.add_argument(
        "--quota",
        nargs="+",
        choices=("none", "local", "redis"),
        default=["local", "redis"],
        help="none: no tenant limits (no admission); local: in process, or the host process",
    )
    parser.add_argument("--proxy-cpus", default="0,1" if cpus <= 2 else "2,3")
    parser.add_argument("--load-cpus", default="0,1" if cpus <= 2 else f"4-{cpus - 1}")
    parser.add_argument("--upstreams", type=int, default=1 if cpus <= 2 else 4)
    parser.add_argument("--wrk-threads", type=int, default=1 if cpus <= 2 else 4)
    parser.add_argument(
        "--upstream",
        choices=("sim", "nginx"),
        default="sim",
        help="sim: the simulated vLLM (Python, --upstreams processes); nginx: a static answer",
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.admissions = 3.0, 1, 4000
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the load: apt-get install -y wrk")
    workdir = Path(tempfile.mkdtemp(prefix="meterproxy-scale-"))
    redis, redis_url = start_redis(str(workdir))
    if args.upstream == "nginx":
        upstreams, upstream_port = start_nginx(workdir, args.load_cpus)
    else:
        upstreams, upstream_port = start_upstreams(args.upstreams, args.load_cpus)
    out = [
        f"machine: {cpus} CPUs, {_cpu_model()}; Python {sys.version.split()[0]}; "
        f"redis-server {_redis_version()}"
    ]
    try:
        time.sleep(1.0)
        if args.mode in ("admission", "all"):
            out += ["", *asyncio.run(admission_in_process(redis_url, args.admissions))]
            out += [
                "",
                *proxy_latency(
                    workdir,
                    upstream_port,
                    redis_url,
                    args.duration,
                    args.load_cpus,
                    args.proxy_cpus,
                ),
            ]
        if args.mode in ("workers", "all"):
            out += ["", *workers_throughput(workdir, upstream_port, redis_url, args)]
    finally:
        for p in upstreams:
            p.terminate()
        redis.terminate()
        for p in (*upstreams, redis):
            p.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(out))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"v=([\d.]+)", out)
    return found.group(1) if found else "?"


if __name__ == "__main__":
    main()
