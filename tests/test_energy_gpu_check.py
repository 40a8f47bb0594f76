"""The GPU energy check runs end to end without a GPU: against the simulated vLLM and against the
random-weight Llama server (tiny, on the CPU), with meterproxy's NVML source reading a fake
pynvml whose power follows the upstream's load. The Llama server itself speaks OpenAI's
protocol to the official SDK and batches continuously without changing any sequence's output."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "energy_gpu_check.py"


def need_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        if os.environ.get("CI"):
            pytest.fail("torch is missing; .ci/run installs the CPU build (pip install torch)")
        pytest.skip("torch is not installed (pip install torch): the Llama server needs it")


def run_check(tmp_path: Path, *args: str) -> dict:  # type: ignore[type-arg]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(CHECK), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "On a GPU machine" in result.stdout  # the instructions for the day a GPU is at hand
    table = (tmp_path / "energy_gpu_check.md").read_text()
    assert "| # | prompt words |" in table and "Concurrent run: measured" in table
    report: dict = json.loads((tmp_path / "energy_gpu_check.json").read_text())  # type: ignore[type-arg]
    return report


def assert_sound(report: dict, requests: int) -> None:  # type: ignore[type-arg]
    rows = report["rows"]
    assert len(rows) == requests
    assert all(r["attributed_j"] and r["attributed_j"] > 0 for r in rows)
    assert report["conservation_j"] < 1e-3  # attributed + idle = measured, to the millijoule
    assert report["sum_error_j"] < 1e-3  # the per-request figures add up to the attributed total
    assert report["idle_j"] > 0 and report["attributed_j"] > 0
    # A request alone: the proxy's figure is its isolated energy (the busy board, edges handled).
    assert report["alone_error_p90"] < 0.03, [
        (r["alone_attributed_j"], r["isolated_j"]) for r in rows
    ]
    assert any(not r["streamed"] for r in rows)


@pytest.mark.slow
def test_the_check_runs_against_the_simulated_vllm(tmp_path: Path) -> None:
    assert_sound(run_check(tmp_path, "--simulated", "--requests", "4"), 4)


@pytest.mark.slow
def test_the_check_runs_against_the_llama_server_on_the_cpu(tmp_path: Path) -> None:
    need_torch()
    assert_sound(run_check(tmp_path, "--simulated", "llama-tiny", "--requests", "5"), 5)


@pytest.fixture
async def llama_url() -> AsyncIterator[str]:
    need_torch()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "benchmarks" / "llama_server.py"),
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        assert b"listening on" in line, line
        yield line.decode().split()[-1]
    finally:
        process.terminate()
        await process.wait()


async def test_the_llama_server_speaks_openai_and_batches_without_changing_outputs(
    llama_url: str,
) -> None:
    async with openai.AsyncOpenAI(base_url=llama_url, api_key="none", max_retries=0) as client:
        prompt = " ".join(f"word{i}" for i in range(300))

        async def streamed(content: str, tokens: int) -> tuple[str, object]:
            stream = await client.chat.completions.create(
                model="random-llama",
                messages=[{"role": "user", "content": content}],
                max_tokens=tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            return text, usage

        alone, usage = await streamed(prompt, 24)
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (300, 24)  # type: ignore[attr-defined]
        others = [streamed(f"other{k} " * (40 * k + 10), 30 + k) for k in range(5)]
        batched, *_ = await asyncio.gather(streamed(prompt, 24), *others)
        assert batched[0] == alone  # greedy: batching and chunked prefill change nothing
        whole = await client.chat.completions.create(
            model="random-llama", messages=[{"role": "user", "content": prompt}], max_tokens=24
        )
        assert whole.choices[0].message.content == alone.strip()
        assert whole.usage is not None and whole.usage.completion_tokens == 24
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="random-llama", messages=[{"role": "user", "content": "x"}], max_tokens=9999
            )
