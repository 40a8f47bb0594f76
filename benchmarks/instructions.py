"""Instructions per request: the proxy's CPU work counted, not timed.

Each proxy runs under valgrind (cachegrind, no cache simulation), which counts the
instructions its process executes, in every thread. Three runs per proxy, 16 requests in
flight, every body distinct:

    A: N1 requests    B: N2 requests    C: N1 requests, then idle as long as B ran longer than A

(B - C) / (N2 - N1) is what one request costs: start-up, shutdown and what runs on a timer
(writer intervals, energy readings, sweeps) cancel out. On this project's VM a timed CPU figure
spreads ±5 % between runs; these counts repeat within ~1 %, so a change of a few percent can be
judged, and two checkouts compared (`--also PATH`: another tree's `src`, run as the quick
start, e.g. a worktree of the round's first commit). A count is not a time (a cache miss costs
more than an add), and under valgrind (~30x slower) work done per interval meets fewer
requests per interval than at full speed (the ledger commits a transaction per ~10 rows
instead of ~250): its share is overstated.

    python benchmarks/instructions.py [--requests 300,1300] [--also /path/to/other/checkout]

Needs valgrind (Debian package `valgrind`). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (
    _FAKE_GPU_SERVE,
    ALL_METERS,
    AUTH,
    BARE,
    QUICK_START,
    ROOT,
    UPSTREAM_MODELS,
    all_meters_config,
    free_port,
    launch,
    wait_up,
)

CONCURRENCY = 16
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _serve(src: Path) -> str:
    """A `python -c` program running the meterproxy CLI of `src`."""
    return f"import sys\nsys.path.insert(0, {str(src)!r})\n" + (
        "from meterproxy.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )


def proxies(upstream: str, work: Path, also: list[Path]) -> dict[str, list[str]]:
    """Name -> the argv after `python` (its own --port appended at launch)."""
    config = all_meters_config(work, upstream)
    serve = ["serve", "--log-level", "WARNING"]
    out = {
        BARE: [str(ROOT / "benchmarks" / "bare_proxy.py"), "--upstream", upstream],
        QUICK_START: ["-c", _serve(ROOT / "src"), *serve, "--upstream", upstream + "/v1"],
        ALL_METERS: ["-c", _FAKE_GPU_SERVE, *serve, "--config", str(config)],
    }
    for path in also:
        src = path / "src" if (path / "src" / "meterproxy").is_dir() else path
        out[f"{QUICK_START} ({path})"] = ["-c", _serve(src), *serve, "--upstream", upstream + "/v1"]
    return out


async def _load(url: str, n: int) -> None:
    numbers = itertools.count()
    async with aiohttp.ClientSession(headers=AUTH) as http:

        async def one() -> None:
            while (i := next(numbers)) < n:
                body = {
                    "model": "bench-small",
                    "messages": [{"role": "user", "content": f"Count the cost, please. ({i})"}],
                }
                async with http.post(url + "/v1/chat/completions", json=body) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status} from {url}")

        await asyncio.gather(*(one() for _ in range(CONCURRENCY)))


def counted(argv: list[str], work: Path, requests: int, idle_s: float) -> tuple[int, float]:
    """(instructions the proxy ran over its life, seconds its requests took)."""
    port = free_port()
    log = work / f"valgrind-{port}.log"
    proc = launch(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            f"--log-file={log}",
            # This interpreter (a venv's own path: valgrind runs it with its packages)
            sys.executable,
            *argv,
            "--port",
            str(port),
        ],
        1,
        {"XDG_STATE_HOME": str(work / f"state-{port}")},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_up(url + "/v1"))  # 90 s: valgrind starts Python in ~15
        t = time.monotonic()
        asyncio.run(_load(url, requests))
        took = time.monotonic() - t
        time.sleep(idle_s)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    found = _REFS.search(log.read_text())
    if found is None:
        raise RuntimeError(f"no instruction count in {log}")
    return int(found.group(1).replace(",", "")), took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", default="300,1300", help="N1,N2 (default 300,1300)")
    parser.add_argument("--also", type=Path, action="append", default=[], metavar="PATH")
    parser.add_argument("--only", action="append", default=[], help="run only these proxies")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed: apt-get install -y valgrind")
    n1, n2 = (int(n) for n in args.requests.split(","))
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="meterproxy-instr-"))
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    models = [a for m in UPSTREAM_MODELS for a in ("--model", m)]
    upstream = launch([py, "-m", "meterproxy.sim.upstream", "--port", str(up_port), *models], 0)
    if os.cpu_count() and os.cpu_count() >= 2 and shutil.which("taskset"):  # type: ignore[operator]
        os.sched_setaffinity(0, {0})  # this client beside the upstream; proxies on core 1
    rows: list[tuple[str, float, float]] = []
    try:
        for name, argv in proxies(upstream_url, work, args.also).items():
            if args.only and name not in args.only:
                continue
            a, took_a = counted(argv, work, n1, 0.0)
            b, took_b = counted(argv, work, n2, 0.0)
            c, _ = counted(argv, work, n1, max(took_b - took_a, 0.0))
            per_request = (b - c) / (n2 - n1)
            idle_per_s = (c - a) / max(took_b - took_a, 1e-9)
            rows.append((name, per_request, idle_per_s))
            print(f"{name}: {per_request / 1e3:,.0f} k instructions a request", flush=True)
    finally:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait(10)
    floor = next((r[1] for r in rows if r[0] == BARE), None)
    print(f"\nInstructions per request ({n2 - n1} requests, {CONCURRENCY} in flight, valgrind):\n")
    print(
        "| proxy | k instructions a request | vs bare | timers: M instructions a valgrind second |"
    )
    print("|---|---|---|---|")
    for name, per_request, idle in rows:
        ratio = f"{per_request / floor:.2f}x" if floor else "-"
        print(f"| {name} | {per_request / 1e3:,.0f} | {ratio} | {idle / 1e6:,.1f} |")


if __name__ == "__main__":
    main()
