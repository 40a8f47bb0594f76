"""The benchmark harness keeps working (a 1-second run per scenario; figures not checked)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .missing import missing

ROOT = Path(__file__).resolve().parent.parent


def test_overhead_harness_runs() -> None:
    if shutil.which("wrk") is None:
        missing("wrk is not installed (apt-get install -y wrk)")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "overhead.py"),
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
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for target in ("bare aiohttp", "serve --upstream", "all meters"):
        assert f"| chat | 1 | {target} |" in result.stdout
        assert f"| stream256-openai | 1 | {target} |" in result.stdout
    assert "open loop p50 ms" in result.stdout
    assert "KiB per slowly-read stream" in result.stdout
    assert "| no open-loop request above 50 ms |" in result.stdout
