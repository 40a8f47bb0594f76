"""Choosing and opening the configured energy source: `none`, no GPUs, the simulated GPUs, and a
DCGM exporter (a local one serving the exporter's text, and one that is not there). A source
that cannot be opened is one log line and energy off, never a crash."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from meterproxy.energy.dcgm import DcgmSource
from meterproxy.energy.factory import open_source
from meterproxy.energy.settings import EnergySettings
from meterproxy.energy.simulated import SimulatedGpus

# What dcgm-exporter serves (trimmed to the two fields the source reads, plus one it ignores).
EXPORTER = """\
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-5f3c",device="nvidia0"} 81234567
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="1",UUID="GPU-77aa",device="nvidia1"} 1234
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-5f3c",device="nvidia0"} 312.5
DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-5f3c"} 44
"""


@pytest.fixture
async def exporter() -> AsyncIterator[str]:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=EXPORTER)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    await runner.cleanup()


async def opened(settings: EnergySettings, gpus: list[str]) -> Any:
    """Opening blocks (a first scrape), as it does off the loop in the proxy."""
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: open_source(settings, gpus, lambda: 42)
    )


def test_none_is_off_even_with_gpus() -> None:
    assert open_source(EnergySettings(source="none"), ["0"]) is None


def test_without_gpus_energy_is_off_and_only_an_explicit_source_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="meterproxy.energy.factory"):
        assert open_source(EnergySettings(source="auto"), []) is None
        assert caplog.records == []
        assert open_source(EnergySettings(source="simulated"), []) is None
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING and "no upstream lists `gpus`" in warning.getMessage()


def test_simulated_gpus_read_on_the_given_clock() -> None:
    source = open_source(EnergySettings(source="simulated"), ["0", "GPU-x"], lambda: 7)
    assert isinstance(source, SimulatedGpus) and source.name == "simulated"
    readings = source.read()
    assert [(r.gpu, r.t_ns) for r in readings] == [("0", 7), ("GPU-x", 7)]


async def test_dcgm_is_scraped_by_index_or_uuid(exporter: str) -> None:
    source = await opened(EnergySettings(source="dcgm", dcgm_url=exporter), ["0", "GPU-77aa"])
    assert isinstance(source, DcgmSource) and source.name == "dcgm"
    readings = await asyncio.get_running_loop().run_in_executor(None, source.read)
    assert [(r.gpu, r.t_ns, r.energy_mj, r.power_w) for r in readings] == [
        ("0", 42, 81234567, 312.5),
        ("GPU-77aa", 42, 1234, None),
    ]


@pytest.mark.parametrize(
    ("url", "gpus", "says"),
    [
        ("http://127.0.0.1:9/metrics", ["0"], "DCGM exporter"),  # nothing listens there
        (None, ["3"], "no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION for GPU 3"),
    ],
    ids=["unreachable", "missing-gpu"],
)
async def test_a_dcgm_source_that_cannot_open_turns_energy_off_with_an_error(
    exporter: str, url: str | None, gpus: list[str], says: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="meterproxy.energy.factory"):
        assert await opened(EnergySettings(source="dcgm", dcgm_url=url or exporter), gpus) is None
    [error] = caplog.records
    message = error.getMessage()
    assert "energy source dcgm is unavailable" in message and says in message
    assert "energy metering is off" in message
