"""The simulated LiteLLM (flavor `litellm`) against LiteLLM's own bytes.

tests/data/litellm/ holds what `litellm[proxy]==1.80.0` sent in front of this project's
simulated vLLM (see tests/data/record.py); the same fake, in LiteLLM's flavor, must send the same
bytes for the same requests, apart from what LiteLLM makes anew per request (its clock, and the
ids it invents for Responses items and reset streams).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from meterproxy.sim.upstream import Behavior, FakeUpstream, with_failure

DATA = Path(__file__).parent / "data" / "litellm"
CASES: dict[str, Any] = json.loads((DATA / "cases.json").read_text())

_BASE = Behavior(tokens=3)
# The models the recording's fake served (tokens=3 each).
MODELS = {
    "sim-llama": _BASE,
    "sim-r1": Behavior(tokens=3, cached_tokens=2, reasoning_tokens=2),
    "sim-500": with_failure(_BASE, "http_500_html"),
    "sim-400": with_failure(_BASE, "http_400"),
    "sim-401": with_failure(_BASE, "http_401"),
    "sim-inband": with_failure(_BASE, "in_band_error"),
    "sim-inband0": with_failure(_BASE, "in_band_error", 0),
    "sim-reset": with_failure(_BASE, "reset"),
}

_PER_REQUEST = [
    (re.compile(rb'"(id|item_id)":"[^"]*"'), rb'"\1":"*"'),
    (re.compile(rb'"(created|created_at)":\d+'), rb'"\1":0'),
]


def mask(raw: bytes) -> bytes:
    for pattern, replacement in _PER_REQUEST:
        raw = pattern.sub(replacement, raw)
    return raw


@pytest.fixture
async def litellm() -> AsyncIterator[str]:
    runner = web.AppRunner(FakeUpstream("litellm", dict(MODELS)).app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.mark.parametrize("name", sorted(CASES))
async def test_litellm_flavor_sends_litellms_bytes(litellm: str, name: str) -> None:
    case = CASES[name]
    recorded = (DATA / f"{name}.sse").read_bytes()
    # The fake's prompt count depends on the request only; Authorization is what the recording's
    # LiteLLM sent its upstream (its configured key, "none").
    headers = {"Authorization": "Bearer none"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(litellm + case["path"], json=case["request"], headers=headers) as response,
    ):
        body = await response.read()
        assert (response.status, response.headers["Content-Type"]) == (
            case["status"],
            case["content_type"],
        )
    if case["path"] == "/v1/responses":
        # LiteLLM 1.80.0 still ended Responses streams with [DONE]; its current source doesn't,
        # and the flavor follows the source (see sim/litellm.py).
        assert recorded.endswith(b"data: [DONE]\n\n")
        recorded = recorded.removesuffix(b"data: [DONE]\n\n")
    assert mask(body) == mask(recorded)
