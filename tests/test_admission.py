"""Admission, on a runtime built by create_app with the real in-process quota: the model
allow-list, the per-request output cap (refused above it, filled in below it), and the quota
reservation: the prompt plus n x the output cap, capped and uncapped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meterproxy import admission, config, intake
from meterproxy.app import create_app
from meterproxy.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Endpoint
from meterproxy.errors import MaxTokensExceeded, ModelNotAllowed, RateLimited
from meterproxy.exchange import Exchange
from meterproxy.keys import RUNTIME
from meterproxy.policy import hash_key
from meterproxy.quota_local import LocalQuota
from meterproxy.runtime import Runtime

from .factories import exchange

MODEL = "llama-3-8b"
PROMPT = [{"role": "user", "content": "Name three colours, then three more."}]


def runtime(tmp_path: Path, **limits: int) -> Runtime:
    tree = {
        "upstreams": [
            {"name": "u", "url": "http://127.0.0.1:9/v1", "models": [MODEL, "embed", "other-7b"]}
        ],
        "aliases": {"fast": MODEL},
        "tenants": {
            "limited": {"keys": [f"sha256:{hash_key('k1')}"], "limits": limits},
            "picky": {"keys": [f"sha256:{hash_key('k2')}"], "models": ["llama-*", "fast"]},
            "free": {"keys": [f"sha256:{hash_key('k3')}"]},
        },
        "quota": {"output_reservation": {"embed": 7}, "state_path": str(tmp_path / "q.db")},
        "ledger": {"enabled": False},
    }
    settings = config.parse(tree, {})
    return create_app(settings, registry=CollectorRegistry(), energy=None)[RUNTIME]


def request(rt: Runtime, tenant: str, body: dict[str, Any], endpoint: Endpoint = CHAT) -> Exchange:
    ex = exchange(endpoint=endpoint, tenant=rt.settings.tenancy.tenants[tenant])
    ex.body = body
    ex.body_bytes = len(str(body))
    intake.read_facts(ex, body)
    route = rt.router.resolve(body["model"])
    assert route is not None
    ex.route = route
    return ex


def prompt_tokens(rt: Runtime, endpoint: Endpoint, body: dict[str, Any]) -> int:
    return rt.tokens.count_prompt(MODEL, endpoint, body)


def in_flight(rt: Runtime, tenant: str) -> int:
    assert isinstance(rt.quota, LocalQuota)
    return rt.quota.quota.state(tenant).concurrent


async def test_a_model_outside_the_allow_list_is_a_403_naming_what_is_allowed(
    tmp_path: Path,
) -> None:
    rt = runtime(tmp_path)
    ex = request(rt, "picky", {"model": "other-7b", "messages": PROMPT})
    with pytest.raises(ModelNotAllowed) as refused:
        await admission.admit(rt, ex)
    assert refused.value.status == 403 and refused.value.param == "model"
    assert "`picky` may not use model `other-7b` (allowed: llama-*, fast)" in refused.value.message
    assert ex.ticket is None


async def test_the_allow_list_matches_the_canonical_name_or_the_name_asked_for(
    tmp_path: Path,
) -> None:
    rt = runtime(tmp_path)
    for model in (MODEL, "fast"):
        ex = request(rt, "picky", {"model": model, "messages": PROMPT})
        assert await admission.admit(rt, ex) is False  # no limits: nothing reserved
        assert ex.ticket is None


async def test_a_tenant_without_limits_is_never_counted(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 10**6}
    ex = request(rt, "free", body)
    assert await admission.admit(rt, ex) is False
    assert ex.ticket is None and in_flight(rt, "free") == 0 and body["max_tokens"] == 10**6


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        (CHAT, "max_tokens"),
        (CHAT, "max_completion_tokens"),
        (COMPLETIONS, "max_tokens"),
        (RESPONSES, "max_output_tokens"),
    ],
)
async def test_an_output_cap_above_the_tenants_is_a_400_naming_the_field(
    tmp_path: Path, endpoint: Endpoint, field: str
) -> None:
    rt = runtime(tmp_path, max_tokens_per_request=100)
    ex = request(rt, "limited", {"model": MODEL, "prompt": "x", "input": "x", field: 101}, endpoint)
    with pytest.raises(MaxTokensExceeded) as refused:
        await admission.admit(rt, ex)
    assert refused.value.param == field and refused.value.status == 400
    assert f"{field} is 101 but tenant `limited` may ask for at most 100" in refused.value.message
    assert in_flight(rt, "limited") == 0


@pytest.mark.parametrize(
    ("endpoint", "filled"),
    [(CHAT, "max_tokens"), (COMPLETIONS, "max_tokens"), (RESPONSES, "max_output_tokens")],
)
async def test_the_tenants_cap_is_filled_in_when_the_client_set_none(
    tmp_path: Path, endpoint: Endpoint, filled: str
) -> None:
    rt = runtime(tmp_path, max_tokens_per_request=100)
    body = {"model": MODEL, "messages": PROMPT, "prompt": "x", "input": "x"}
    ex = request(rt, "limited", body, endpoint)
    assert await admission.admit(rt, ex) is True
    assert body[filled] == 100 and ex.ticket is not None
    # A cap within the limit is left as the client set it.
    kept = {"model": MODEL, "prompt": "x", "input": "x", filled: 60}
    assert await admission.admit(rt, request(rt, "limited", kept, endpoint)) is False
    assert kept[filled] == 60


async def test_the_reservation_is_the_prompt_plus_n_times_the_cap(tmp_path: Path) -> None:
    rt = runtime(tmp_path, tokens_per_minute=100_000)
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 50, "n": 3}
    ex = request(rt, "limited", body)
    assert ex.choices == 3
    await admission.admit(rt, ex)
    assert ex.ticket is not None
    assert ex.ticket.reserved == prompt_tokens(rt, CHAT, body) + 3 * 50
    assert in_flight(rt, "limited") == 1
    best_of = {"model": MODEL, "prompt": "Colours:", "max_tokens": 20, "n": 2, "best_of": 4}
    ex = request(rt, "limited", best_of, COMPLETIONS)
    await admission.admit(rt, ex)
    assert ex.ticket is not None
    assert ex.ticket.reserved == prompt_tokens(rt, COMPLETIONS, best_of) + 4 * 20


async def test_an_uncapped_request_reserves_the_default_and_a_filled_cap_replaces_it(
    tmp_path: Path,
) -> None:
    rt = runtime(tmp_path, tokens_per_day=10**9)
    body = {"model": MODEL, "messages": PROMPT, "n": 2}
    ex = request(rt, "limited", body)
    await admission.admit(rt, ex)
    assert ex.ticket is not None
    assert ex.ticket.reserved == prompt_tokens(rt, CHAT, body) + 2 * 4096
    rt = runtime(tmp_path, tokens_per_day=10**9, max_tokens_per_request=30)
    body = {"model": MODEL, "messages": PROMPT, "n": 2}
    ex = request(rt, "limited", body)
    await admission.admit(rt, ex)
    assert ex.ticket is not None
    assert ex.ticket.reserved == prompt_tokens(rt, CHAT, body) + 2 * 30


async def test_embeddings_reserve_their_prompt_only(tmp_path: Path) -> None:
    rt = runtime(tmp_path, tokens_per_minute=100_000, max_tokens_per_request=5)
    body = {"model": "embed", "input": ["red", "green", "blue"]}
    ex = request(rt, "limited", body, EMBEDDINGS)
    assert await admission.admit(rt, ex) is False  # nothing to fill in
    assert ex.ticket is not None
    assert ex.ticket.reserved == rt.tokens.count_prompt("embed", EMBEDDINGS, body) > 0


async def test_only_request_limits_reserve_no_tokens(tmp_path: Path) -> None:
    rt = runtime(tmp_path, requests_per_minute=2)
    for _ in range(2):
        ex = request(rt, "limited", {"model": MODEL, "messages": PROMPT})
        await admission.admit(rt, ex)
        assert ex.ticket is not None and ex.ticket.reserved == 0
    with pytest.raises(RateLimited):
        await admission.admit(rt, request(rt, "limited", {"model": MODEL, "messages": PROMPT}))


async def test_a_capped_request_must_fit_whole_and_an_uncapped_one_while_room_is_left(
    tmp_path: Path,
) -> None:
    rt = runtime(tmp_path, tokens_per_minute=1_000)
    capped = {"model": MODEL, "messages": PROMPT, "max_tokens": 2_000}
    with pytest.raises(RateLimited) as refused:
        await admission.admit(rt, request(rt, "limited", capped))
    assert refused.value.limit == "tokens_per_minute"
    # Uncapped, it reserves far more than the limit (4096), yet the window is not full.
    uncapped = request(rt, "limited", {"model": MODEL, "messages": PROMPT})
    await admission.admit(rt, uncapped)
    assert uncapped.ticket is not None and uncapped.ticket.reserved > 1_000
    # Now the window is full: the next one waits, capped or not.
    with pytest.raises(RateLimited):
        await admission.admit(rt, request(rt, "limited", {"model": MODEL, "messages": PROMPT}))
