"""Settlements and exchanges for unit tests, with every field defaulted."""

from __future__ import annotations

from typing import Any

from meterproxy.endpoints import CHAT
from meterproxy.exchange import Exchange, Outcome
from meterproxy.settlement import Settlement
from meterproxy.usage import Source, Usage

_BASE = Settlement(
    request_id="mp-test-1",
    endpoint="chat_completions",
    tenant="anonymous",
    model="m",
    upstream="u",
    status="200",
    outcome=Outcome.SUCCESS,
    usage=Usage(10, 5, None, None, Source.UPSTREAM),
    estimated=False,
    streamed=False,
    started_ns=0,
    first_token_ns=None,
    ended_ns=10**9,
    ts=1.7e9,
    reached_upstream=True,
    waste_reason=None,
    upstream_error=None,
    client_request_id=None,
    upstream_request_id=None,
    client_user=None,
    gpu_seconds=0.0,
    energy_j=None,
    cost_usd=0.001,
    priced=True,
    ticket=None,
)


def settlement(**changes: Any) -> Settlement:
    return _BASE._replace(**changes)


def exchange(**fields: Any) -> Exchange:
    return Exchange(**{"key": "mp-test-1", "endpoint": CHAT, "started_ns": 0, **fields})
