"""`meterproxy energy`: the fitted model read back from a real /metrics exposition, and from a
running proxy with a fake NVML."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest
from prometheus_client import CollectorRegistry

from meterproxy import cli, config
from meterproxy.app import create_app, start, stop
from meterproxy.energy import view
from meterproxy.energy.calibration import TERMS
from meterproxy.energy.nvml import NvmlSource
from meterproxy.metrics import Metrics
from meterproxy.sim.pynvml_fake import FakeNvml
from meterproxy.sim.upstream import Behavior

from .conftest import StartUpstream


def test_a_trusted_fit_is_shown_term_by_term() -> None:
    m = Metrics(CollectorRegistry())
    for term, value in zip(TERMS, (81.5, 407.6, 0.0, 0.0065, 0.025, 0.0386), strict=True):
        m.energy_model.labels("0", term).set(value)
    m.energy_model_trusted.labels("0").set(1)
    m.energy_model_in_use.labels("0").set(1)
    m.energy_model_error.labels("0").set(0.016)
    m.energy_model_windows.labels("0").set(49)
    m.energy_model_trusted.labels("GPU-abc").set(0)
    m.energy_model_in_use.labels("GPU-abc").set(1)
    m.energy_model.labels("GPU-abc", "idle_w").set(60.0)
    m.energy_model_trusted.labels("GPU-new").set(0)
    m.gpu_energy.labels("0").inc(5000)
    m.gpu_idle_energy.labels("0").inc(1200)
    gpus = view.parse(m.exposition().decode())
    assert gpus["0"].trusted and gpus["0"].terms["floor_w"] == 407.6
    assert not gpus["GPU-abc"].trusted
    text = view.render(gpus)
    assert "the fit" in text and "407.6" in text and "1.6%" in text
    assert "GPU 0: 5000 J measured, 3800 J attributed to requests, 1200 J idle" in text
    assert "the fit (young)" in text.splitlines()[2]  # used before it is backed by data
    assert "defaults" in text.splitlines()[3]


async def test_meterproxy_energy_reads_a_running_proxy(
    start_upstream: StartUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    up = await start_upstream({"sim-llama": Behavior(tokens=30, pace_s=0.01)})
    t0 = time.monotonic()
    fake = FakeNvml({"0": lambda t: (t - t0) * 250_000})
    settings = config.parse(
        {
            "upstreams": [{"name": "gpu", "url": up.url, "kind": "vllm", "gpus": [0]}],
            "ledger": {"enabled": False},
            "quota": {"state_path": str(tmp_path / "q.db")},
            "server": {"unready_delay_s": 0},
        },
        {},
    )
    app = create_app(settings, registry=CollectorRegistry(), energy=NvmlSource(fake, ["0"]))
    server = await start(app, "127.0.0.1", 0)
    try:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="k") as client:
            for _ in range(3):
                await client.chat.completions.create(
                    model="sim-llama", messages=[{"role": "user", "content": "hi"}]
                )
        await asyncio.sleep(1.3)  # a full fit window
        code = await asyncio.to_thread(cli.main, ["energy", "--url", server.url])
    finally:
        await stop(server)
    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("GPU  attribution uses")
    # The fake board draws 250 W whatever runs: the fit finds no work in the energy, so
    # attribution keeps the defaults (a fit whose tokens explain nothing is not used).
    assert "defaults (fitting)" in out
    assert "J measured" in out
    assert await asyncio.to_thread(cli.main, ["energy", "--url", "http://127.0.0.1:9"]) == 1
