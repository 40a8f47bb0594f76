"""What a test does when a tool it drives is not on this machine: skip with the reason (and how
to get the tool) on a developer's machine, fail under CI, where .ci/run installs everything."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> NoReturn:
    if under_ci():
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)
