"""Per-request energy on a real GPU: each request alone (its isolated energy, read from the GPU's
own counter), then all of them at once through meterproxy with its NVML energy source; prints
attributed vs isolated per request (joules, and as shares of the total) and conservation.

On a GPU machine, against any OpenAI-compatible server on GPU 0 (vLLM, or the random-weight
server in this folder, which needs no download):

    python benchmarks/llama_server.py --shape 3b --port 8000 &        # or: vllm serve ...
    python benchmarks/energy_gpu_check.py --upstream http://127.0.0.1:8000/v1 \\
        --model random-llama --gpu 0 --out results/

    (benchmarks/gpu_check.sh does all of it, with timeouts, and writes the table and JSON.)

Here, without a GPU (the simulated upstream and a fake NVML whose power follows its load):

    python benchmarks/energy_gpu_check.py --simulated

Reading the result: an isolated run gets the whole busy board (idle level included) for its
duration; run together, requests share the board's static power, so absolute joules drop. The
share columns compare like with like: a request's part of the concurrent run's attributed
energy against its part of the sum of isolated energies ("above idle": the same with the idle
level taken out of each isolated run). Conservation: attributed + idle = measured over the
concurrent run, and the per-request figures add up to the attributed total.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from meterproxy import config
from meterproxy.app import create_app, start, stop
from meterproxy.energy.nvml import NvmlSource
from meterproxy.keys import RUNTIME
from meterproxy.settlement import Settlement as Record

# (prompt words, completion tokens, streamed): mixed sizes, some not streamed
MIX = [
    (200, 256, True),
    (1500, 64, True),
    (400, 160, False),
    (3000, 48, True),
    (100, 320, True),
    (800, 128, False),
    (2000, 96, True),
    (300, 200, True),
]
GPU_INSTRUCTIONS = """\
On a GPU machine (NVIDIA driver, `pip install nvidia-ml-py`):
  1. Serve a model on GPU 0: `vllm serve <model> --port 8000`, or with no weights at all:
     `python benchmarks/llama_server.py --shape 3b --port 8000` (torch + CUDA).
  2. `python benchmarks/energy_gpu_check.py --upstream http://127.0.0.1:8000/v1 --model <name> \\
        --gpu 0 --out results/`
  Nothing else may use the GPU meanwhile: the isolated energies are read from its counter.
  `bash benchmarks/gpu_check.sh` runs steps 1-2 with the random-weight server and timeouts."""


@dataclass
class Row:
    index: int
    prompt_words: int
    completion_tokens: int
    streamed: bool
    isolated_s: float
    isolated_j: float  # the board's counter over its run alone (plus the counter's tail)
    isolated_above_idle_j: float
    alone_attributed_j: float | None  # what the proxy attributed to it alone
    concurrent_s: float = 0.0
    attributed_j: float | None = None  # what the proxy attributed to it among the others
    share_error: float | None = None  # attributed share / isolated share - 1
    share_error_above_idle: float | None = None


@dataclass
class Report:
    mode: str
    gpu: str
    idle_w: float
    rows: list[Row]
    measured_j: float  # over the concurrent run (proxy's counters)
    attributed_j: float
    idle_j: float
    per_request_sum_j: float
    conservation_j: float  # |attributed + idle - measured|
    sum_error_j: float  # |sum of per-request figures - attributed|
    share_error_p50: float
    share_error_p90: float
    share_error_above_idle_p90: float
    alone_error_p90: float  # proxy's attribution of a request alone vs its isolated energy


def _prompt(words: int, salt: int) -> str:
    return " ".join(f"w{salt}x{i}" for i in range(words))


async def _one(
    http: aiohttp.ClientSession,
    url: str,
    model: str,
    words: int,
    tokens: int,
    streamed: bool,
    salt: int,
) -> tuple[str, float]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": _prompt(words, salt)}],
        "max_tokens": tokens,
        "stream": streamed,
    }
    started = time.monotonic()
    async with http.post(url + "/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} from the proxy: {await response.text()}")
        async for _ in response.content.iter_any():
            pass
        return response.headers["x-meterproxy-request-id"], time.monotonic() - started


async def _settled(records: dict[str, Record], ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(i not in records for i in ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"requests not settled after {timeout_s} s: energy never final?")
        await asyncio.sleep(0.05)


def _total(registry: CollectorRegistry, name: str) -> float:
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0


async def run_check(
    upstream_url: str,
    model: str,
    gpu: str,
    read_mj: Callable[[], float],
    source: NvmlSource | None,
    mix: list[tuple[int, int, bool]],
    mode: str,
    progress: Callable[[str], None],
) -> Report:
    """Start meterproxy in this process (its NVML source: `source`, else the configured nvml),
    measure idle, the requests alone, then together."""
    settings = config.parse(
        {
            "upstreams": [{"name": "gpu", "url": upstream_url, "kind": "vllm", "gpus": [gpu]}],
            "ledger": {"enabled": False},
            "quota": {"state_path": ":memory:"},
            "server": {"unready_delay_s": 0},
            "energy": {"source": "nvml", "interval_s": 0.1},
        },
        {},
    )
    registry = CollectorRegistry()
    records: dict[str, Record] = {}

    def sink(record: Record) -> None:
        records[record.request_id] = record

    kwargs: dict[str, Any] = {} if source is None else {"energy": source}
    app = create_app(settings, registry=registry, sinks=[sink], **kwargs)
    server = await start(app, "127.0.0.1", 0)
    if getattr(app[RUNTIME].energy, "source", None) is None:
        await stop(server)
        raise SystemExit("meterproxy opened no energy source (its log above says why)")
    url = server.url + "/v1"
    loop = asyncio.get_running_loop()

    async def counter() -> float:
        return await loop.run_in_executor(None, read_mj)

    try:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            progress("warm-up request")
            await _one(http, url, model, 50, 8, True, 999)
            await asyncio.sleep(1.0)
            progress("idle baseline (3 s)")
            e0, t0 = await counter(), time.monotonic()
            await asyncio.sleep(3.0)
            idle_w = (await counter() - e0) / 1000 / (time.monotonic() - t0)
            progress(f"idle: {idle_w:.1f} W")
            rows: list[Row] = []
            tail_s = 0.4  # the counter's update lag: read again after the end
            for i, (words, tokens, streamed) in enumerate(mix):
                e0 = await counter()
                rid, took = await _one(http, url, model, words, tokens, streamed, i)
                await asyncio.sleep(tail_s)
                e1 = await counter()
                await _settled(records, [rid], 30)
                isolated = (e1 - e0) / 1000 - idle_w * tail_s
                rows.append(
                    Row(
                        i,
                        words,
                        tokens,
                        streamed,
                        took,
                        isolated,
                        isolated - idle_w * took,
                        records[rid].energy_j,
                    )
                )
                progress(f"alone #{i}: {took:.2f} s, {isolated:.1f} J")
                await asyncio.sleep(0.5)
            before = [
                _total(registry, n)
                for n in (
                    "meterproxy_gpu_energy_joules_total",
                    "meterproxy_energy_joules_total",
                    "meterproxy_gpu_idle_energy_joules_total",
                )
            ]
            progress(f"all {len(mix)} together")
            done = await asyncio.gather(
                *(_one(http, url, model, w, t, s, i) for i, (w, t, s) in enumerate(mix))
            )
            ids = [rid for rid, _ in done]
            await _settled(records, ids, 30)
            await asyncio.sleep(0.5)
            after = [
                _total(registry, n)
                for n in (
                    "meterproxy_gpu_energy_joules_total",
                    "meterproxy_energy_joules_total",
                    "meterproxy_gpu_idle_energy_joules_total",
                )
            ]
    finally:
        await stop(server)
    measured, attributed, idle = (a - b for a, b in zip(after, before, strict=True))
    for row, (rid, took) in zip(rows, done, strict=True):
        row.concurrent_s, row.attributed_j = took, records[rid].energy_j
    known = [r for r in rows if r.attributed_j is not None]
    total_att = sum(r.attributed_j or 0.0 for r in known)
    total_iso = sum(r.isolated_j for r in known)
    total_dyn = sum(max(r.isolated_above_idle_j, 0.0) for r in known)
    for r in known:
        share = (r.attributed_j or 0.0) / total_att if total_att else 0.0
        r.share_error = share / (r.isolated_j / total_iso) - 1 if total_iso else None
        dyn = max(r.isolated_above_idle_j, 0.0)
        r.share_error_above_idle = share / (dyn / total_dyn) - 1 if total_dyn and dyn else None
    errors = [abs(r.share_error) for r in known if r.share_error is not None]
    dyn_errors = [
        abs(r.share_error_above_idle) for r in known if r.share_error_above_idle is not None
    ]
    alone = [
        abs(r.alone_attributed_j / r.isolated_j - 1)
        for r in rows
        if r.alone_attributed_j is not None and r.isolated_j > 0
    ]
    return Report(
        mode=mode,
        gpu=gpu,
        idle_w=idle_w,
        rows=rows,
        measured_j=measured,
        attributed_j=attributed,
        idle_j=idle,
        per_request_sum_j=total_att,
        conservation_j=abs(attributed + idle - measured),
        sum_error_j=abs(total_att - attributed),
        share_error_p50=statistics.median(errors) if errors else 0.0,
        share_error_p90=_p(errors, 0.9),
        share_error_above_idle_p90=_p(dyn_errors, 0.9),
        alone_error_p90=_p(alone, 0.9),
    )


def render(report: Report) -> str:
    def j(v: float | None) -> str:
        return "unknown" if v is None else f"{v:.1f}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:+.1%}"

    lines = [
        f"GPU energy check ({report.mode}, GPU {report.gpu}, idle {report.idle_w:.1f} W)",
        "",
        "| # | prompt words | tokens | streamed | alone s | isolated J | above idle J | "
        "proxy alone J | together s | attributed J | share error | share error above idle |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.index} | {r.prompt_words} | {r.completion_tokens} | "
            f"{'yes' if r.streamed else 'no'} | {r.isolated_s:.2f} | {r.isolated_j:.1f} | "
            f"{r.isolated_above_idle_j:.1f} | {j(r.alone_attributed_j)} | {r.concurrent_s:.2f} | "
            f"{j(r.attributed_j)} | {pct(r.share_error)} | {pct(r.share_error_above_idle)} |"
        )
    lines += [
        "",
        f"Concurrent run: measured {report.measured_j:.1f} J = attributed "
        f"{report.attributed_j:.1f} J + idle {report.idle_j:.1f} J "
        f"(conservation error {report.conservation_j * 1000:.3f} mJ); per-request figures sum to "
        f"{report.per_request_sum_j:.1f} J (off by {report.sum_error_j * 1000:.3f} mJ).",
        f"Share error vs isolated: p50 {report.share_error_p50:.1%}, p90 "
        f"{report.share_error_p90:.1%} (above idle: p90 {report.share_error_above_idle_p90:.1%}); "
        f"the proxy's figure for a request alone vs its isolated energy: p90 "
        f"{report.alone_error_p90:.1%}.",
    ]
    return "\n".join(lines)


def write(report: Report, out: Path | None) -> None:
    text = render(report)
    print(text, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "energy_gpu_check.md").write_text(text + "\n")
        (out / "energy_gpu_check.json").write_text(json.dumps(asdict(report), indent=2) + "\n")


async def simulated(mix: list[tuple[int, int, bool]], out: Path | None, server: str) -> Report:
    """Everything in this process: an upstream (the simulated vLLM, or the random-weight Llama
    server on the CPU at a tiny shape), a GPU whose power follows that upstream's load, the fake
    pynvml reading that GPU, and meterproxy's real NVML source on top."""
    from aiohttp import web

    from meterproxy.sim.gpu_load import LoadDrivenGpu
    from meterproxy.sim.pynvml_fake import FakeNvml
    from meterproxy.sim.upstream import Behavior, FakeUpstream

    stop_engine: Callable[[], None] = lambda: None  # noqa: E731
    if server == "llama-tiny":
        import threading

        import llama_server  # this folder: the server the GPU run uses, at a tiny shape

        engine = llama_server.build("tiny", "cpu", 16, 4096)
        threading.Thread(target=engine.run, name="engine", daemon=True).start()
        app, model, stop_engine = (
            llama_server.make_app(engine, "random-llama", 4096),
            "random-llama",
            engine.stop,
        )
    else:
        fake = FakeUpstream(models={"sim-llama": Behavior(tokens=10_000, pace_s=0.004)})
        app, model = fake.app(), "sim-llama"
    gpu = LoadDrivenGpu()
    gpu.watch(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    nvml = FakeNvml({"0": gpu.energy_mj}, clock=time.monotonic)
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    try:
        report = await run_check(
            upstream,
            model,
            "0",
            lambda: float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)),
            NvmlSource(nvml, ["0"]),
            mix,
            f"{server} upstream, fake NVML",
            lambda line: print(f"[check] {line}", file=sys.stderr, flush=True),
        )
    finally:
        stop_engine()
        await runner.cleanup()
    write(report, out)
    return report


async def on_gpu(args: argparse.Namespace, mix: list[tuple[int, int, bool]]) -> Report:
    try:
        import pynvml
    except ImportError:
        raise SystemExit(
            "pynvml is missing: pip install nvidia-ml-py\n\n" + GPU_INSTRUCTIONS
        ) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise SystemExit(f"NVML is not usable here ({exc}).\n\n{GPU_INSTRUCTIONS}") from None
    handle = (
        pynvml.nvmlDeviceGetHandleByIndex(int(args.gpu))
        if args.gpu.isdigit()
        else pynvml.nvmlDeviceGetHandleByUUID(args.gpu)
    )
    name = pynvml.nvmlDeviceGetName(handle)
    print(f"[check] GPU {args.gpu}: {name}", file=sys.stderr, flush=True)
    read_mj: Callable[[], float] = lambda: float(  # noqa: E731
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    )
    try:
        read_mj()
    except pynvml.NVMLError as exc:
        raise SystemExit(
            f"GPU {args.gpu} has no total-energy counter ({exc}); the isolated energies need it"
        ) from None
    report = await run_check(
        args.upstream,
        args.model,
        args.gpu,
        read_mj,
        None,  # meterproxy opens NVML itself, as configured
        mix,
        f"real GPU ({name})",
        lambda line: print(f"[check] {line}", file=sys.stderr, flush=True),
    )
    write(report, args.out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=GPU_INSTRUCTIONS,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--upstream", help="the OpenAI-compatible server's /v1 URL (on a GPU)")
    where.add_argument(
        "--simulated",
        choices=("sim-vllm", "llama-tiny"),
        nargs="?",
        const="sim-vllm",
        help="no GPU: the simulated vLLM (default) or the Llama server at a tiny shape on the CPU",
    )
    parser.add_argument("--model", default="random-llama")
    parser.add_argument("--gpu", default="0", help="NVML index or UUID the server runs on")
    parser.add_argument("--requests", type=int, default=len(MIX), help=f"at most {len(MIX)}")
    parser.add_argument("--out", type=Path, help="write energy_gpu_check.md and .json here")
    args = parser.parse_args(argv)
    mix = MIX[: max(2, min(args.requests, len(MIX)))]
    if args.simulated:
        asyncio.run(simulated(mix, args.out, args.simulated))
        print("\n" + GPU_INSTRUCTIONS)
    else:
        asyncio.run(on_gpu(args, mix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
