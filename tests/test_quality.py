"""The house rules as tests: ruff (lint) on src and tests, mypy --strict on src."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .missing import missing

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str) -> list[str]:
    if shutil.which(name) is None:
        missing(f"{name} is not installed; `pip install -e '.[dev]'` provides it")
    return [sys.executable, "-m", name]


def test_ruff_finds_nothing() -> None:
    result = subprocess.run(
        [*tool("ruff"), "check", "src", "tests"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_src() -> None:
    result = subprocess.run(tool("mypy"), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
