"""`meterproxy demo` as a newcomer runs it: URLs printed, live figures, a clean Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from .test_cli_serve import free_port


async def test_demo_shows_live_plausible_figures_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meterproxy",
        "demo",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "state"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    banner = b""
    try:
        while b"Ctrl-C stops" not in banner:
            banner += await asyncio.wait_for(proc.stdout.readline(), 30)
        assert f"http://127.0.0.1:{port}/v1".encode() in banner
        await asyncio.sleep(9)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as r,
        ):
            text = await r.text()
    finally:
        proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.stdout.read(), 15)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    # The banner gives every key and the status page; a live summary follows every few seconds.
    for key in ("demo-research-key", "demo-support-key", "demo-tokenmaxx-key", "demo-admin-key"):
        assert key.encode() in banner
    assert f"http://127.0.0.1:{port}/ui#key=demo-admin-key".encode() in banner
    assert re.search(
        rb"\d\d:\d\d:\d\d  [\d,]+ tokens/s \xc2\xb7 [\d.,]+ tokens/J"
        rb" \xc2\xb7 \$[\d.,]+ per M tokens",
        rest,
    )
    for tenant in (b"research", b"support", b"tokenmaxx"):  # each one's spend and waste share
        assert re.search(rb"\n  " + tenant + rb" +\$[\d.,]+ spent \xc2\xb7 [\d.]+ ?% wasted", rest)
    assert b"Traceback" not in rest
    # Its ledger stays where `meterproxy usage` (the command it prints) reads it.
    ledger = tmp_path / "state" / "meterproxy-usage.db"
    assert f"meterproxy usage --ledger {ledger}".encode() in banner
    report = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meterproxy", "usage", "--ledger", str(ledger), "--format", "csv"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "research" in report.stdout and "support" in report.stdout

    def total(name: str, **labels: str) -> float:
        pattern = rf"^{name}\{{([^}}]*)\}} ([0-9.e+-]+)$"
        return sum(
            float(m.group(2))
            for m in re.finditer(pattern, text, re.M)
            if all(f'{k}="{v}"' in m.group(1) for k, v in labels.items())
        )

    tokens = total("meterproxy_tokens_total", type="completion") + total(
        "meterproxy_tokens_total", type="prompt"
    )
    joules = total("meterproxy_energy_joules_total")
    watts = total("meterproxy_gpu_power_watts")
    assert tokens > 1000 and joules > 0
    assert 70 <= watts <= 700  # between idle and the board limit
    assert 1 <= tokens / joules <= 20  # 8B-class models on modern GPUs
    for tenant in ("research", "support"):
        assert total("meterproxy_requests_total", tenant=tenant, status="200") > 0
    assert total("meterproxy_quota_rejections_total", tenant="support") > 0
    assert total("meterproxy_wasted_tokens_total", reason="truncated") > 0
    assert total("meterproxy_cost_usd_total") > 0
    # Tasks and their outcomes: research's succeed, the token loop repeats itself.
    assert total("meterproxy_task_outcomes_total", tenant="research", result="success") > 0
    assert total("meterproxy_task_cost_usd_total", tenant="research") > 0
    assert total("meterproxy_feedback_reports_total") > 0
    assert total("meterproxy_duplicate_requests_total", tenant="tokenmaxx") > 0
    assert total("meterproxy_duplicate_requests_total", tenant="research") == 0
    assert total("meterproxy_wasted_tokens_total", tenant="tokenmaxx", reason="duplicate") > 0


async def test_a_port_in_use_is_one_clear_line_for_demo_serve_and_workers(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in (
            ["demo", "--data-dir", str(tmp_path / "d")],
            ["serve", "--upstream", "http://127.0.0.1:9/v1", "--data-dir", str(tmp_path / "s")],
            [
                "serve",
                "--upstream",
                "http://127.0.0.1:9/v1",
                "--workers",
                "2",
                "--data-dir",
                str(tmp_path / "w"),
            ],
        ):
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "meterproxy", *command, "--port", str(port)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 1
            assert (
                f"error: port {port} on 127.0.0.1 is already in use; pick another with --port"
                in (result.stderr)
            )
            assert "Traceback" not in result.stderr + result.stdout
