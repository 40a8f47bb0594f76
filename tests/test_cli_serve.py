"""`meterproxy serve` as a real process: the README quick start, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from meterproxy.sim.upstream import Behavior

from .conftest import StartUpstream, Upstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"


async def launch(*args: str, cwd: Path) -> Process:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meterproxy",
        "serve",
        *args,
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(cwd / "state")},
        cwd=cwd,
    )
    process = Process(proc, port)
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(process.url + "/healthz") as r:
                    if r.status == 200:
                        return process
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError((await proc.communicate())[0].decode())


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


async def test_quick_start_with_one_upstream(
    start_upstream: StartUpstream, processes: list[Process], tmp_path: Path
) -> None:
    up: Upstream = await start_upstream({"llama-3.1-8b": Behavior()})
    proxy = await launch("--upstream", up.url, cwd=tmp_path)
    processes.append(proxy)
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0) as c:
        assert [m.id async for m in c.models.list()] == ["llama-3.1-8b"]
        stream = await c.chat.completions.create(
            model="llama-3.1-8b", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == " the quick brown fox jumps over lazy dog"
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as r:
        metrics = await r.text()
    assert (
        'meterproxy_tokens_total{model="llama-3.1-8b",tenant="anonymous",type="completion",'
        'upstream="default"} 8.0'
    ) in metrics
    assert "_created" not in metrics  # no *_created series: half the exposition, never read
    # The databases live in the state directory, not wherever the proxy was started.
    await asyncio.sleep(0.3)
    assert (tmp_path / "state" / "meterproxy" / "meterproxy-usage.db").exists()
    assert (tmp_path / "state" / "meterproxy" / "meterproxy-quota.db").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".db")]


async def test_sigterm_turns_unready_then_drains_streams_and_exits_zero(
    start_upstream: StartUpstream, processes: list[Process], tmp_path: Path
) -> None:
    up: Upstream = await start_upstream({"slow": Behavior(tokens=40, pace_s=0.025)})
    cfg = tmp_path / "meterproxy.yaml"
    cfg.write_text(
        f"upstreams: [{{name: gpu, url: '{up.url}', kind: vllm}}]\n"
        "server: {drain_timeout_s: 10, unready_delay_s: 0.4}\n"
    )
    proxy = await launch("--config", str(cfg), cwd=tmp_path)
    processes.append(proxy)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/readyz") as r:
            assert r.status == 200
        response = await http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
        first = await response.content.readline()
        assert first.startswith(b"data: ") and b'"role":"assistant"' in first
        proxy.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with http.get(proxy.url + "/readyz") as r:
            assert r.status == 503 and "draining" in await r.text()
        rest = await response.content.read()  # the in-flight stream runs to its end
        assert rest.endswith(b"data: [DONE]\n\n") and rest.count(b'"content":" ') == 40
        assert await asyncio.wait_for(proxy.proc.wait(), 10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
    log = (await proxy.proc.stdout.read()).decode()  # type: ignore[union-attr]
    assert "draining in-flight requests" in log and "stopped" in log


async def test_bad_config_exits_1_with_every_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("upstreams: [{name: a, url: 'nope'}]\nlisten: {port: -1}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meterproxy",
        "serve",
        "--config",
        str(cfg),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert err.decode().splitlines() == [
        "error: listen.port: expected an integer from 0 to 65535, got -1",
        "error: upstreams[0].url: expected an http:// or https:// URL, got 'nope'",
    ]


async def test_sighup_reloads_the_config(
    start_upstream: StartUpstream, processes: list[Process], tmp_path: Path
) -> None:
    up: Upstream = await start_upstream({"m": Behavior()})
    cfg = tmp_path / "meterproxy.yaml"
    cfg.write_text(f"upstreams: [{{name: gpu, url: '{up.url}'}}]\nauth: {{mode: open}}\n")
    proxy = await launch("--config", str(cfg), cwd=tmp_path)
    processes.append(proxy)
    cfg.write_text(f"upstreams: [{{name: gpu, url: '{up.url}'}}]\naliases: {{fast: m}}\n")
    proxy.proc.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as http:
        for _ in range(50):
            async with http.get(proxy.url + "/v1/models") as r:
                if "fast" in [m["id"] for m in (await r.json())["data"]]:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("alias not served after SIGHUP")
    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proxy.proc.wait(), 10) == 0
    log = (await proxy.proc.stdout.read()).decode()  # type: ignore[union-attr]
    assert "SIGHUP: reloading the configuration" in log


async def test_serve_with_a_simulated_gpu_shows_tokens_per_joule(
    start_upstream: StartUpstream, processes: list[Process], tmp_path: Path
) -> None:
    up: Upstream = await start_upstream({"llama": Behavior(tokens=60, pace_s=0.005)})
    cfg = tmp_path / "meterproxy.yaml"
    cfg.write_text(
        f"upstreams: [{{name: gpu, url: '{up.url}', kind: vllm, gpus: [0]}}]\n"
        "energy: {source: simulated}\n"
    )
    proxy = await launch("--config", str(cfg), cwd=tmp_path)
    processes.append(proxy)
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k") as c:
        for _ in range(3):
            stream = await c.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async for _ in stream:
                pass
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as r:
        text = await r.text()
    values = {}
    for line in text.splitlines():
        if line.startswith(("meterproxy_tokens_total{", "meterproxy_energy_joules_total{")):
            name = line.split("{")[0] + (
                "/" + line.split('type="')[1].split('"')[0] if 'type="' in line else ""
            )
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    tokens = values["meterproxy_tokens_total/prompt"] + values["meterproxy_tokens_total/completion"]
    joules = values["meterproxy_energy_joules_total"]
    assert 'meterproxy_energy_source_up{source="simulated"} 1.0' in text
    assert 0.3 < tokens / joules < 30  # plausible for an 8B-class model
