"""The benchmark harness keeps working (a 1-second run per scenario; figures not checked)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from .missing import missing

ROOT = Path(__file__).resolve().parent.parent


def benchmark(script: str, *args: str, timeout_s: float) -> str:
    """Runs benchmarks/<script> with `args`; its standard output, once it exits cleanly."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_overhead_harness_runs() -> None:
    if shutil.which("wrk") is None:
        missing("wrk is not installed (apt-get install -y wrk)")
    stdout = benchmark(
        "overhead.py",
        "--quick",
        "--duration",
        "1",
        "--levels",
        "1",
        "--ttft-rounds",
        "5",
        "--idle-streams",
        "20",
        "--slow-streams",
        "10",
        "--open-loop-s",
        "1",
        timeout_s=240,
    )
    for target in ("bare aiohttp", "serve --upstream", "all meters"):
        assert f"| chat | 1 | {target} |" in stdout
        assert f"| stream256-openai | 1 | {target} |" in stdout
    assert "open loop p50 ms" in stdout
    assert "KiB per slowly-read stream" in stdout
    assert "| no open-loop request above 50 ms |" in stdout


async def test_the_wrk_driver_sends_each_request_distinct(tmp_path: Path) -> None:
    """A body holding __N__ goes out with a number unique to each request, across wrk's
    threads: the benchmarks measure traffic, not one request repeated."""
    if shutil.which("wrk") is None:
        missing("wrk is not installed (apt-get install -y wrk)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import wrk_load

    seen: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    body = tmp_path / "body.json"
    body.write_text('{"messages": [{"role": "user", "content": "hi (__N__)"}]}')
    try:
        result = await asyncio.to_thread(
            wrk_load.run,
            ["wrk", "-t2", "-c4", "-d1s"],
            f"http://127.0.0.1:{port}/v1/chat/completions",
            body,
            "key",
        )
    finally:
        await runner.cleanup()
    assert result["requests"] > 10 and result["errors"] == 0
    assert len(seen) >= result["requests"]
    assert len(set(seen)) == len(seen)  # no two alike
    assert all(b"__N__" not in b and orjson.loads(b)["messages"] for b in seen)


@pytest.mark.slow
def test_instructions_harness_runs() -> None:
    """benchmarks/instructions.py counts a request's instructions under valgrind (the bare
    floor only, a handful of requests: the harness, not the figure)."""
    if shutil.which("valgrind") is None:
        missing("valgrind is not installed (apt-get install -y valgrind)")
    stdout = benchmark(
        "instructions.py", "--requests", "10,40", "--only", "bare aiohttp", timeout_s=600
    )
    row = next(line for line in stdout.splitlines() if line.startswith("| bare aiohttp |"))
    float(row.split("|")[2].replace(",", ""))  # a count came back (its value is not judged)
    assert "1.00x" in row  # the floor is its own reference
