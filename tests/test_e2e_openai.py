"""End to end through the real server with the official openai SDK, sync and async."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from meterproxy.sim.upstream import Behavior

from .conftest import Proxy, StartProxy, StartUpstream, Upstream

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something about foxes"},
]


def client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)


def tokens(proxy: Proxy, kind: str, model: str = "sim-llama") -> float:
    return proxy.sample(
        "meterproxy_tokens_total", model=model, upstream="local", tenant="anonymous", type=kind
    )


async def test_non_streaming_chat_is_metered_from_upstream_usage(proxy: Proxy) -> None:
    async with client(proxy) as c:
        reply = await c.chat.completions.create(model="sim-llama", messages=MESSAGES)
    assert reply.choices[0].message.content == " the quick brown fox jumps over lazy dog"
    assert reply.usage is not None
    assert tokens(proxy, "prompt") == reply.usage.prompt_tokens
    assert tokens(proxy, "completion") == reply.usage.completion_tokens == 8
    [record] = proxy.settled
    assert (record.status, record.usage.source.value, record.estimated) == (
        "200",
        "upstream",
        False,
    )
    assert (
        proxy.sample(
            "meterproxy_requests_total",
            endpoint="chat_completions",
            model="sim-llama",
            upstream="local",
            tenant="anonymous",
            status="200",
        )
        == 1
    )


async def test_sync_sdk_streams_through_the_proxy(proxy: Proxy) -> None:
    def run() -> list[openai.types.chat.ChatCompletionChunk]:
        # The sync client blocks, so it runs in a thread while the proxy serves on this loop.
        with openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0) as c:
            return list(
                c.chat.completions.create(model="sim-llama", messages=MESSAGES, stream=True)
            )

    chunks = await asyncio.to_thread(run)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == " the quick brown fox jumps over lazy dog"
    assert all(ch.usage is None for ch in chunks)
    assert tokens(proxy, "completion") == 8


async def raw_stream(http: aiohttp.ClientSession, base: str, body: dict[str, object]) -> bytes:
    async with http.post(base + "/chat/completions", json=body) as response:
        assert response.status == 200
        return await response.read()


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize(
    ("flavor", "kind"),
    [("vllm", "vllm"), ("trtllm", "trtllm"), ("openai", "openai"), ("litellm", "openai")],
)
async def test_stream_bytes_equal_a_direct_connection_without_include_usage(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    flavor: str,
    kind: str,
    n: int,
) -> None:
    up: Upstream = await start_upstream(flavor=flavor)
    proxy: Proxy = await start_proxy(
        {"upstreams": [{"name": "local", "url": up.url, "kind": kind}]}
    )
    body = {"model": "sim-llama", "messages": MESSAGES, "stream": True, "n": n}
    direct = await raw_stream(http, up.url, body)
    proxied = await raw_stream(http, proxy.base_url, body)
    assert b'"choices":[]' not in proxied and b'"usage"' not in proxied
    # The proxy asked the upstream for usage; whatever the upstream added for it (a usage-only
    # chunk, `"usage":null` on every chunk, a chunk carrying only usage) was removed, the rest
    # is byte for byte what a direct client gets.
    assert up.fake.seen[-1].body["stream_options"] == {"include_usage": True}
    assert proxied == direct
    assert tokens(proxy, "completion") == 8 * n
    assert proxy.settled[0].usage.source.value == "upstream"


async def test_client_that_asks_for_usage_gets_it_untouched(
    proxy: Proxy, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "sim-llama",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    direct = await raw_stream(http, upstream.url, body)
    proxied = await raw_stream(http, proxy.base_url, body)
    assert proxied == direct
    async with client(proxy) as c:
        stream = await c.chat.completions.create(
            model="sim-llama",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert tokens(proxy, "completion") == 16


async def test_continuous_usage_counts_the_last_cumulative_value_never_a_sum(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "sim-llama",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    raw = await raw_stream(http, proxy.base_url, body)
    assert raw.count(b'"usage":') == 10  # role, 8 tokens, usage-only chunk
    [record] = proxy.settled
    assert record.usage.completion == 8
    assert tokens(proxy, "completion") == 8


async def test_cached_and_reasoning_tokens_are_metered(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = await start_upstream({"sim-r1": Behavior(tokens=12, cached_tokens=5, reasoning_tokens=4)})
    proxy = await start_proxy({"upstreams": [{"name": "local", "url": up.url, "kind": "vllm"}]})
    async with client(proxy) as c:
        await c.chat.completions.create(model="sim-r1", messages=MESSAGES)
        stream = await c.chat.completions.create(model="sim-r1", messages=MESSAGES, stream=True)
        async for _ in stream:
            pass
    assert tokens(proxy, "cached_prompt", "sim-r1") == 10
    assert tokens(proxy, "reasoning", "sim-r1") == 8
    assert tokens(proxy, "completion", "sim-r1") == 24


async def test_completions_stream_and_non_stream(proxy: Proxy) -> None:
    async with client(proxy) as c:
        reply = await c.completions.create(
            model="sim-llama", prompt="Once upon a time", max_tokens=5
        )
        stream = await c.completions.create(
            model="sim-llama", prompt="Once upon a time", stream=True
        )
        text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert reply.choices[0].text == " the quick brown fox jumps"
    assert reply.choices[0].finish_reason == "length"
    assert text == " the quick brown fox jumps over lazy dog"
    assert tokens(proxy, "completion") == 13
    # A response cut by max_tokens is waste of reason `truncated`.
    assert (
        proxy.sample(
            "meterproxy_wasted_tokens_total",
            model="sim-llama",
            tenant="anonymous",
            reason="truncated",
        )
        == 5
    )


async def test_embeddings(proxy: Proxy) -> None:
    async with client(proxy) as c:
        result = await c.embeddings.create(model="sim-llama", input=["a b c", "d e"])
    assert len(result.data) == 2
    assert tokens(proxy, "prompt") == result.usage.prompt_tokens > 0
    assert tokens(proxy, "completion") == 0


async def test_responses_api_stream_and_non_stream(proxy: Proxy) -> None:
    async with client(proxy) as c:
        reply = await c.responses.create(model="sim-llama", input="Tell me a story")
        stream = await c.responses.create(model="sim-llama", input="Tell me a story", stream=True)
        kinds = [event.type async for event in stream]
    assert reply.output_text == " the quick brown fox jumps over lazy dog"
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [r.status for r in proxy.settled] == ["200", "200"]
    assert tokens(proxy, "completion") == 16
    assert proxy.settled[1].first_token_ns is not None


async def test_responses_cut_by_max_output_tokens_are_truncation_waste_streamed_or_not(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # OpenAI's Responses API ends a reply cut by max_output_tokens in `response.incomplete`.
    up: Upstream = await start_upstream(flavor="openai")
    proxy: Proxy = await start_proxy(
        {"upstreams": [{"name": "openai", "url": up.url, "kind": "openai"}]}
    )
    async with client(proxy) as c:
        reply = await c.responses.create(model="sim-llama", input="Hi", max_output_tokens=3)
        stream = await c.responses.create(
            model="sim-llama", input="Hi", max_output_tokens=3, stream=True
        )
        kinds = [event.type async for event in stream]
    assert reply.status == "incomplete" and kinds[-1] == "response.incomplete"
    assert [(r.status, r.waste_reason) for r in proxy.settled] == [
        ("200", "truncated"),
        ("200", "truncated"),  # the streamed reply too, judged by its final event
    ]
    assert proxy.total("meterproxy_wasted_tokens_total", reason="truncated") == 6


async def test_models_lists_the_union_of_upstreams_and_aliases(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    a = await start_upstream({"llama-8b": Behavior(), "qwen-7b": Behavior()})
    b = await start_upstream({"mistral-7b": Behavior()})
    proxy = await start_proxy(
        {
            "upstreams": [
                {"name": "a", "url": a.url, "kind": "vllm"},
                {"name": "b", "url": b.url, "kind": "trtllm", "models": ["mistral-7b"]},
            ],
            "aliases": {"default": "mistral-7b"},
        }
    )
    async with client(proxy) as c:
        ids = sorted([m.id async for m in c.models.list()])
        one = await c.models.retrieve("llama-8b")
        reply = await c.chat.completions.create(model="default", messages=MESSAGES)
    assert ids == ["default", "llama-8b", "mistral-7b", "qwen-7b"]
    assert one.id == "llama-8b"
    # An alias is rewritten to the model it names, and metered under that name.
    assert b.fake.seen[-1].body["model"] == "mistral-7b"
    assert reply.model == "mistral-7b"
    assert proxy.settled[-1].model == "mistral-7b" and proxy.settled[-1].upstream == "b"


async def test_upstream_key_is_injected_and_client_key_never_forwarded(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = await start_upstream()
    proxy = await start_proxy(
        {"upstreams": [{"name": "local", "url": up.url, "api_key_env": "UP_KEY"}]},
        environ={"UP_KEY": "sk-upstream-secret"},
    )
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client-key") as c:
        await c.chat.completions.create(model="sim-llama", messages=MESSAGES)
    headers = up.fake.seen[-1].headers
    assert headers["Authorization"] == "Bearer sk-upstream-secret"
    assert "sk-client-key" not in str(headers)


async def test_hundred_concurrent_streams_are_metered_exactly(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = await start_upstream({"sim-llama": Behavior(tokens=20, pace_s=0.002)})
    proxy = await start_proxy({"upstreams": [{"name": "local", "url": up.url, "kind": "vllm"}]})

    async def one(c: openai.AsyncOpenAI, i: int) -> int:
        stream = await c.chat.completions.create(
            model="sim-llama",
            messages=[{"role": "user", "content": "word " * i}],
            stream=True,
            max_tokens=5 + i % 15,
        )
        return sum(
            [1 async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
        )

    async with client(proxy) as c:
        counts = await asyncio.gather(*(one(c, i) for i in range(100)))
    assert counts == [5 + i % 15 for i in range(100)]
    assert len(proxy.settled) == 100
    # Request for request, the metered usage is what the upstream counted and reported.
    truth = {seen.headers["x-request-id"]: seen for seen in up.fake.seen}
    for record in proxy.settled:
        seen = truth[record.request_id]
        assert record.usage.source.value == "upstream"
        assert (record.usage.prompt, record.usage.completion) == (
            seen.prompt_tokens,
            seen.generated,
        )
    assert tokens(proxy, "completion") == sum(s.generated for s in truth.values()) == sum(counts)
    assert tokens(proxy, "prompt") == sum(s.prompt_tokens or 0 for s in truth.values())
    assert proxy.sample("meterproxy_inflight_requests", upstream="local") == 0


async def test_latency_histograms_measure_ttft_and_time_per_output_token(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up = await start_upstream({"sim-llama": Behavior(tokens=11, first_token_s=0.15, pace_s=0.03)})
    proxy = await start_proxy({"upstreams": [{"name": "local", "url": up.url, "kind": "vllm"}]})
    async with client(proxy) as c:
        stream = await c.chat.completions.create(model="sim-llama", messages=MESSAGES, stream=True)
        async for _ in stream:
            pass
    labels = {"model": "sim-llama", "upstream": "local"}
    ttft = proxy.sample("meterproxy_time_to_first_token_seconds_sum", **labels)
    tpot = proxy.sample("meterproxy_time_per_output_token_seconds_sum", **labels)
    e2e = proxy.sample("meterproxy_request_duration_seconds_sum", **labels)
    assert 0.15 <= ttft < 0.25
    assert 0.03 <= tpot < 0.045  # 10 gaps of 30 ms after the first token
    assert ttft + 10 * 0.03 <= e2e < 0.8
    assert proxy.sample("meterproxy_time_to_first_token_seconds_bucket", le="0.25", **labels) == 1


async def test_other_v1_paths_are_forwarded_by_model_else_to_the_first_upstream(
    start_upstream: StartUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a = await start_upstream({"m-a": Behavior()})
    b = await start_upstream({"m-b": Behavior()})
    proxy = await start_proxy(
        {"upstreams": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}]}
    )
    async with http.post(
        proxy.base_url + "/tokenize?x=1", json={"model": "m-b", "prompt": "hi"}
    ) as r:
        assert r.status == 200 and (await r.json())["path"] == "/v1/tokenize?x=1"
    async with http.get(proxy.base_url + "/files") as r:
        assert r.status == 200
    assert [s.path for s in b.fake.seen] == ["/v1/tokenize"]
    assert [s.path for s in a.fake.seen] == ["/v1/files"]
    assert [(r.endpoint, r.upstream) for r in proxy.settled] == [("other", "b"), ("other", "a")]


async def test_headers_end_to_end_kept_hop_by_hop_dropped(
    proxy: Proxy, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "1",
        "Proxy-Authorization": "p",
        "X-Trace": "abc",
        "OpenAI-Organization": "org",
        "x-request-id": "client-42",
    }
    body = {"model": "sim-llama", "messages": MESSAGES, "stream": True}
    async with http.post(
        proxy.base_url + "/chat/completions", json=body, headers=headers
    ) as response:
        await response.read()
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert response.headers["x-request-id"] == "client-42"
    seen = upstream.fake.seen[-1].headers
    assert seen["X-Trace"] == "abc" and seen["OpenAI-Organization"] == "org"
    assert "X-Hop" not in seen and "Proxy-Authorization" not in seen
    assert seen["x-request-id"] == "client-42"
    assert proxy.settled[-1].client_request_id == "client-42"


async def test_operational_endpoints(proxy: Proxy, http: aiohttp.ClientSession) -> None:
    async with http.get(proxy.url + "/healthz") as r:
        assert r.status == 200
    async with http.get(proxy.url + "/readyz") as r:
        assert r.status == 200  # the upstream answered its /v1/models at startup
    async with http.get(proxy.url + "/metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    assert "# TYPE meterproxy_requests_total counter" in text
    async with http.get(proxy.url + "/nope") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_url"
