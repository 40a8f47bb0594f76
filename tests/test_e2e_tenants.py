"""Tenants end to end with the official SDK: keys, allow-lists, limits, 429s, persistence,
hot reload."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from prometheus_client import CollectorRegistry

from meterproxy import cli, config
from meterproxy.app import create_app, start, stop
from meterproxy.policy import hash_key
from meterproxy.quota_local import LocalQuota
from meterproxy.sim.upstream import Behavior, with_failure
from meterproxy.tokens import LEARNED_FROM_BYTES, RATIO_SAMPLES, TokenCounter

from .conftest import Proxy, StartProxy, StartUpstream, Upstream

MESSAGES = [{"role": "user", "content": "Say something about foxes"}]
RESEARCH_KEY = "mp-research-0123456789"
SUPPORT_KEY = "mp-support-abcdef"


def tenants_tree(up: Upstream, **research_limits: Any) -> dict[str, Any]:
    return {
        "upstreams": [{"name": "gpu", "url": up.url, "kind": "vllm"}],
        "tenants": {
            "research": {
                "keys": ["env:RESEARCH_KEY"],
                "models": ["llama-*"],
                "limits": research_limits,
            },
            "support": {"keys": [f"sha256:{hash_key(SUPPORT_KEY)}"]},
        },
    }


async def start_tenants(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    models: dict[str, Behavior] | None = None,
    **limits: Any,
) -> tuple[Upstream, Proxy]:
    up: Upstream = await start_upstream(
        models or {"llama-3.1-8b": Behavior(), "qwen-7b": Behavior()}
    )
    proxy: Proxy = await start_proxy(
        tenants_tree(up, **limits), environ={"RESEARCH_KEY": RESEARCH_KEY}
    )
    return up, proxy


def sdk(proxy: Proxy, key: str, retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=key, max_retries=retries)


async def test_keys_authenticate_tenants_and_never_leak(
    start_upstream: StartUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, proxy = await start_tenants(start_upstream, start_proxy)
    async with sdk(proxy, RESEARCH_KEY) as c:
        await c.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
    async with sdk(proxy, SUPPORT_KEY) as c:
        await c.chat.completions.create(model="qwen-7b", messages=MESSAGES)
    async with aiohttp.ClientSession() as http:  # Azure clients send `api-key`
        async with http.post(
            proxy.base_url + "/chat/completions",
            headers={"api-key": SUPPORT_KEY},
            json={"model": "qwen-7b", "messages": MESSAGES},
        ) as r:
            assert r.status == 200
    async with aiohttp.ClientSession() as http:  # no key at all
        async with http.post(
            proxy.base_url + "/chat/completions", json={"model": "qwen-7b", "messages": MESSAGES}
        ) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
    async with sdk(proxy, "mp-wrong-key-999") as c:
        with pytest.raises(openai.AuthenticationError) as caught:
            await c.chat.completions.create(model="qwen-7b", messages=MESSAGES)
    assert caught.value.code == "invalid_api_key"
    assert "mp-wrong" not in caught.value.message
    assert [r.tenant for r in proxy.settled] == [
        "research",
        "support",
        "support",
        "anonymous",
        "anonymous",
    ]
    assert (
        proxy.sample(
            "meterproxy_requests_total",
            endpoint="chat_completions",
            model="llama-3.1-8b",
            upstream="gpu",
            tenant="research",
            status="200",
        )
        == 1
    )
    exposition = "\n".join(str(s) for m in proxy.registry.collect() for s in m.samples)
    for secret in (RESEARCH_KEY, SUPPORT_KEY, "mp-wrong-key-999"):
        assert secret not in caplog.text and secret not in exposition


async def test_model_allow_list_is_403_and_filters_the_model_list(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up, proxy = await start_tenants(start_upstream, start_proxy)
    async with sdk(proxy, RESEARCH_KEY) as c:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await c.chat.completions.create(model="qwen-7b", messages=MESSAGES)
        listed = [m.id async for m in c.models.list()]
    assert caught.value.code == "model_not_allowed"
    assert "llama-*" in caught.value.message
    assert listed == ["llama-3.1-8b"]
    assert len(up.fake.seen) == 0  # refused before any upstream byte
    async with sdk(proxy, SUPPORT_KEY) as c:
        assert sorted([m.id async for m in c.models.list()]) == ["llama-3.1-8b", "qwen-7b"]


async def test_requests_per_minute_admits_exactly_the_limit(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up, proxy = await start_tenants(start_upstream, start_proxy, requests_per_minute=10)
    async with aiohttp.ClientSession() as http:

        async def one() -> tuple[int, dict[str, str], dict[str, Any]]:
            async with http.post(
                proxy.base_url + "/chat/completions",
                headers={"Authorization": f"Bearer {RESEARCH_KEY}"},
                json={"model": "llama-3.1-8b", "messages": MESSAGES},
            ) as r:
                return r.status, dict(r.headers), await r.json()

        results = await asyncio.gather(*(one() for _ in range(100)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10 and statuses.count(429) == 90
    assert len(up.fake.seen) == 10
    _, headers, body = next(r for r in results if r[0] == 429)
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert (
        proxy.sample(
            "meterproxy_quota_rejections_total", tenant="research", limit="requests_per_minute"
        )
        == 90
    )
    assert (
        proxy.sample("meterproxy_quota_usage_ratio", tenant="research", limit="requests_per_minute")
        == 1.0
    )


async def test_the_sdk_retries_a_429_and_succeeds_when_the_window_allows(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    _, proxy = await start_tenants(
        start_upstream,
        start_proxy,
        {"llama-3.1-8b": Behavior(tokens=5, first_token_s=1.2)},
        max_concurrent=1,
    )
    async with sdk(proxy, RESEARCH_KEY, retries=2) as c:
        first = asyncio.create_task(
            c.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
        )
        await asyncio.sleep(0.2)
        # Refused with Retry-After: 1 while the first is in flight; the SDK waits and retries.
        second = await c.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
        await first
    assert second.choices[0].message.content
    assert [r.status for r in proxy.settled].count("429") >= 1
    assert [r.status for r in proxy.settled].count("200") == 2


async def test_token_reservations_settle_to_real_usage_and_are_released_on_errors(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    _, proxy = await start_tenants(
        start_upstream,
        start_proxy,
        {"llama-3.1-8b": Behavior(tokens=8), "llama-bad": with_failure(Behavior(), "http_400")},
        tokens_per_minute=1000,
        max_tokens_per_request=500,
    )
    async with sdk(proxy, RESEARCH_KEY) as c:
        reply = await c.chat.completions.create(
            model="llama-3.1-8b", messages=MESSAGES, max_tokens=400
        )
        # 400 + the prompt is reserved: a second 600-token request does not fit meanwhile...
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="llama-bad", messages=MESSAGES)
    assert reply.usage is not None
    used = reply.usage.prompt_tokens + reply.usage.completion_tokens
    ratio = proxy.sample(
        "meterproxy_quota_usage_ratio", tenant="research", limit="tokens_per_minute"
    )
    assert ratio == pytest.approx(used / 1000)  # ...but after settlement only real usage counts


async def test_max_tokens_per_request_is_enforced_and_filled_in(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up, proxy = await start_tenants(start_upstream, start_proxy, max_tokens_per_request=64)
    async with sdk(proxy, RESEARCH_KEY) as c:
        with pytest.raises(openai.BadRequestError) as caught:
            await c.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES, max_tokens=100)
        await c.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
    assert caught.value.code == "max_tokens_exceeded" and caught.value.param == "max_tokens"
    assert up.fake.seen[-1].body["max_tokens"] == 64


async def test_day_budget_survives_a_restart(start_upstream: StartUpstream, tmp_path: Path) -> None:
    up: Upstream = await start_upstream({"llama-3.1-8b": Behavior(tokens=50)})
    tree = tenants_tree(up, tokens_per_day=100)
    tree["quota"] = {"state_path": str(tmp_path / "quota.db")}
    tree["ledger"] = {"enabled": False}
    tree["server"] = {"unready_delay_s": 0}
    settings = config.parse(tree, {"RESEARCH_KEY": RESEARCH_KEY})

    async def run_once() -> list[int]:
        server = await start(create_app(settings, registry=CollectorRegistry()), "127.0.0.1", 0)
        statuses = []
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=RESEARCH_KEY, max_retries=0
        ) as c:
            for _ in range(2):
                try:
                    await c.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
                    statuses.append(200)
                except openai.RateLimitError as exc:
                    assert exc.code == "insufficient_quota"
                    assert "resets at" in exc.message
                    statuses.append(429)
        await stop(server)
        return statuses

    assert await run_once() == [200, 200]  # 2 x (7 prompt + 50) = 114 >= 100 tokens today
    assert await run_once() == [429, 429]  # after a restart, the day's spend is remembered


async def test_hot_reload_swaps_valid_files_and_keeps_the_old_on_errors(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    up: Upstream = await start_upstream({"llama-3.1-8b": Behavior()})
    path = tmp_path / "meterproxy.yaml"
    tree = tenants_tree(up)
    tree["tenants"]["research"]["keys"] = [f"sha256:{hash_key(RESEARCH_KEY)}"]
    tree["quota"] = {"state_path": str(tmp_path / "quota.db")}
    tree["ledger"] = {"path": str(tmp_path / "ledger.db")}
    tree["server"] = {"unready_delay_s": 0}
    path.write_text(yaml.safe_dump(tree))
    registry = CollectorRegistry()
    app = create_app(
        config.load(path, {}),
        registry=registry,
        reload_from=(str(path), lambda: config.load(path, {})),
    )
    server = await start(app, "127.0.0.1", 0)
    new_key = "mp-newteam-42"

    async def status(key: str) -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                server.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "llama-3.1-8b", "messages": MESSAGES},
            ) as r,
        ):
            return r.status

    async def until(predicate: Any) -> None:
        for _ in range(60):
            if await predicate():
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the reload did not happen")

    try:
        # A long stream in flight across both reloads is not dropped.
        async with aiohttp.ClientSession() as http:
            stream = await http.post(
                server.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
                json={"model": "llama-3.1-8b", "messages": MESSAGES, "stream": True},
            )
            assert await status(new_key) == 401
            tree["tenants"]["newteam"] = {"keys": [f"sha256:{hash_key(new_key)}"]}
            path.write_text(yaml.safe_dump(tree))
            await until(lambda: _is(status(new_key), 200))
            path.write_text("tenants: [this is: not valid\n")
            await until(lambda: _ready(registry))
            assert await status(new_key) == 200 and await status(RESEARCH_KEY) == 200
            assert (await stream.read()).endswith(b"data: [DONE]\n\n")
    finally:
        await stop(server)


async def _is(awaitable: Any, value: int) -> bool:
    return bool(await awaitable == value)


async def _ready(registry: CollectorRegistry) -> bool:
    return (
        registry.get_sample_value("meterproxy_config_reloads_total", {"result": "error"}) or 0
    ) >= 1


def test_hash_key_prints_the_sha256_form(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("test\n"))
    assert cli.main(["hash-key"]) == 0
    assert capsys.readouterr().out == (
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n"
    )


def test_tenant_config_errors_name_their_paths() -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(
            {
                "upstreams": [{"name": "a", "url": "http://x/v1"}],
                "tenants": {
                    "research": {
                        "keys": ["plaintext-key", "env:NOPE"],
                        "limits": {"tokens_per_day": -5, "rpm": 3},
                    }
                },
                "quota": {"timezone": "Mars/Olympus"},
            },
            {},
        )
    assert caught.value.problems == [
        "tenants.research.keys[0]: expected sha256:<64 hex digits> or env:VARIABLE (plain "
        "keys do not belong in the file; `meterproxy hash-key` prints the sha256: form)",
        "tenants.research.keys[1]: environment variable NOPE is not set",
        "tenants.research.limits.rpm: unknown key (expected one of: requests_per_minute, "
        "tokens_per_minute, tokens_per_day, usd_per_month, joules_per_day, max_concurrent, "
        "max_tokens_per_request)",
        "tenants.research.limits.tokens_per_day: expected a positive integer, got -5",
        "auth.mode: is `keys` but no tenant has a key; add tenants.<name>.keys or set "
        "auth.mode: open",
        "quota.timezone: unknown time zone 'Mars/Olympus' (e.g. UTC, Europe/Paris)",
    ]


async def test_large_prompts_are_estimated_from_bytes_once_the_upstream_taught_the_ratio(
    start_upstream: StartUpstream, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counting a 20 KB prompt with tiktoken for its reservation costs milliseconds of CPU; once
    # the upstream's own counts of RATIO_SAMPLES large prompts are known, the reservation uses
    # the highest tokens per byte seen instead (the settlement is exact either way).
    counted: list[int] = []
    reserved: list[int] = []
    real_count, real_admit = TokenCounter.count_prompt, LocalQuota.admit

    def count_prompt(self: TokenCounter, model: str, endpoint: Any, body: Any) -> int:
        counted.append(len(str(body)))
        return real_count(self, model, endpoint, body)

    async def admit(self: LocalQuota, tenant: Any, estimate: int, key: str, **kw: Any) -> Any:
        reserved.append(estimate)
        return await real_admit(self, tenant, estimate, key, **kw)

    monkeypatch.setattr(TokenCounter, "count_prompt", count_prompt)
    monkeypatch.setattr(LocalQuota, "admit", admit)
    _, proxy = await start_tenants(
        start_upstream, start_proxy, tokens_per_minute=10_000_000, max_tokens_per_request=16
    )
    words = "the quick brown fox jumps over the lazy dog while the cat watches closely".split()
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(4000)) for i in range(18)]
    usages = []
    async with sdk(proxy, RESEARCH_KEY) as c:
        for text in prompts:
            reply = await c.chat.completions.create(
                model="llama-3.1-8b", messages=[{"role": "user", "content": text}]
            )
            assert reply.usage is not None
            usages.append(reply.usage.prompt_tokens)
    assert len(prompts[0]) > LEARNED_FROM_BYTES
    assert len(counted) == RATIO_SAMPLES  # the first ones counted; the rest estimated
    for estimate, prompt in zip(reserved[RATIO_SAMPLES:], usages[RATIO_SAMPLES:], strict=True):
        assert prompt <= estimate - 16 <= 1.05 * prompt + 10  # the cap of 16 reserved too
