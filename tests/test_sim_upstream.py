"""The simulated upstream's flavors and vLLM counters, read with the official SDK and parsers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from meterproxy.sim.upstream import Behavior, FakeUpstream, with_failure

MESSAGES: Any = [{"role": "user", "content": "Say something about foxes"}]


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def _serve(fake: FakeUpstream) -> str:
        runner = web.AppRunner(fake.app(), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield _serve
    for runner in runners:
        await runner.cleanup()


def events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: ") and block != b"data: [DONE]":
            out.append(orjson.loads(block[6:]))
    return out


async def post(url: str, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as response:
        return response.status, response.headers, await response.read()


async def test_vllm_streams_n_choices_and_sums_their_usage(serve: Any) -> None:
    fake = FakeUpstream("vllm", {"m": Behavior(tokens=3)})
    base = await serve(fake)
    body = {
        "model": "m",
        "messages": MESSAGES,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, _, raw = await post(base + "/v1/chat/completions", body)
    chunks = events(raw)
    # One role chunk per choice, then each step's token for choice 0 and choice 1.
    order = [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:-1]]
    role = {"role": "assistant", "content": ""}
    assert order[:2] == [(0, role), (1, role)]
    assert [i for i, _ in order[2:]] == [0, 1, 0, 1, 0, 1]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[2:-1]]
    assert finishes == [None, None, None, None, "stop", "stop"]
    # The usage chunk: the prompt once, the completions of both choices.
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 10, "total_tokens": 16, "completion_tokens": 6}
    assert (fake.seen[-1].generated, fake.generated_total) == (6, 6)


async def test_vllm_metrics_count_what_the_engine_did(serve: Any) -> None:
    fake = FakeUpstream(
        "vllm", {"m": Behavior(tokens=5), "gone": with_failure(Behavior(), "reset", after=2)}
    )
    base = await serve(fake)
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as c:
        await c.chat.completions.create(model="m", messages=MESSAGES)  # stop: 5 tokens
        await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, n=2)
        stream = await c.completions.create(model="m", prompt="a b", stream=True)
        async for _ in stream:
            pass
        with pytest.raises(openai.APIConnectionError):
            broken = await c.chat.completions.create(model="gone", messages=MESSAGES, stream=True)
            async for _ in broken:
                pass
        await c.embeddings.create(model="m", input="not counted")
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await response.text()
    samples = {
        (s.name, s.labels.get("model_name"), s.labels.get("finished_reason")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert all(
        s.labels["engine"] == "0"
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )
    prompt = 10  # "Say something about foxes" as one user message
    # n=2 runs two engine requests: its prompt is counted twice, as vLLM does.
    assert samples[("vllm:prompt_tokens_total", "m", None)] == prompt + 2 * prompt + 3
    assert samples[("vllm:generation_tokens_total", "m", None)] == 5 + 2 * 3 + 5
    assert samples[("vllm:request_success_total", "m", "stop")] == 2
    assert samples[("vllm:request_success_total", "m", "length")] == 2
    assert samples[("vllm:request_success_total", "m", "repetition")] == 0
    assert samples[("vllm:generation_tokens_total", "gone", None)] == 2
    assert samples[("vllm:request_success_total", "gone", "abort")] == 1
    assert fake.generated_total == 5 + 6 + 5 + 2


async def test_openai_flavor_sets_usage_null_on_every_chunk_once_asked(serve: Any) -> None:
    base = await serve(FakeUpstream("openai", {"gpt-4o": Behavior(tokens=3, cached_tokens=1)}))
    body: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    _, _, plain = await post(base + "/v1/chat/completions", body)
    body["stream_options"] = {"include_usage": True}
    _, headers, asked = await post(base + "/v1/chat/completions", body)
    assert headers["x-request-id"].startswith("req_")
    assert all("usage" not in chunk for chunk in events(plain))
    chunks = events(asked)
    assert [chunk["usage"] for chunk in chunks[:-1]] == [None] * 5  # role, 3 tokens, finish
    assert chunks[-2]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(chunk["obfuscation"] and chunk["service_tier"] == "default" for chunk in chunks)
    assert list(chunks[0]) == [
        "id",
        "object",
        "created",
        "model",
        "service_tier",
        "system_fingerprint",
        "choices",
        "usage",
        "obfuscation",
    ]
    # Apart from `"usage":null` (and the padding, which OpenAI redraws anyway) the bytes agree.
    assert events(plain)[1]["choices"] == chunks[1]["choices"]
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as c:
        stream = await c.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        parsed = [chunk async for chunk in stream]
        reply = await c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert parsed[-1].usage is not None and parsed[-1].usage.prompt_tokens_details is not None
    assert parsed[-1].usage.prompt_tokens_details.cached_tokens == 1
    assert reply._request_id is not None and reply._request_id.startswith("req_")
    assert reply.choices[0].message.content == " the quick brown"


async def test_openai_flavor_errors_have_openais_shape(serve: Any) -> None:
    models = {"gpt-4o": with_failure(Behavior(), "http_400")}
    base = await serve(FakeUpstream("openai", models))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as caught:
            await c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")


async def test_flavor_is_chosen_per_model(serve: Any) -> None:
    models = {
        "local": Behavior(tokens=2),
        "proxied": Behavior(tokens=2, flavor="litellm"),
        "hosted": Behavior(tokens=2, flavor="openai"),
    }
    base = await serve(FakeUpstream("vllm", models))
    raws = {}
    for model in models:
        body = {"model": model, "messages": MESSAGES, "stream": True}
        body["stream_options"] = {"include_usage": True}
        raws[model] = events((await post(base + "/v1/chat/completions", body))[2])
    assert raws["local"][-1]["choices"] == []  # vLLM: usage-only chunk
    assert raws["proxied"][-1]["choices"] == [{"index": 0, "delta": {}}]  # LiteLLM
    assert "obfuscation" in raws["hosted"][-1]  # OpenAI
    with pytest.raises(ValueError, match="unknown flavor"):
        FakeUpstream("vllm", {"x": Behavior(flavor="tgi")})


async def test_litellm_responses_stream_has_no_event_lines_and_no_done(serve: Any) -> None:
    base = await serve(FakeUpstream("litellm", {"m": Behavior(tokens=2)}))
    body = {"model": "m", "input": "hi there", "stream": True}
    _, _, raw = await post(base + "/v1/responses", body)
    assert b"event:" not in raw and b"[DONE]" not in raw
    kinds = [event["type"] for event in events(raw)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as c:
        stream = await c.responses.create(model="m", input="hi there", stream=True)
        parsed = [event.type async for event in stream]
    assert parsed == kinds


async def test_openai_flavor_ends_responses_incomplete_or_failed(serve: Any) -> None:
    models = {
        "gpt-4o": Behavior(tokens=6),
        "gpt-4o-broken": with_failure(Behavior(tokens=6), "in_band_error", after=2),
    }
    base = await serve(FakeUpstream("openai", models))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as c:
        cut = [
            event
            async for event in await c.responses.create(
                model="gpt-4o", input="hi", max_output_tokens=4, stream=True
            )
        ]
        failed = [
            event
            async for event in await c.responses.create(
                model="gpt-4o-broken", input="hi", stream=True
            )
        ]
        whole = await c.responses.create(model="gpt-4o", input="hi", max_output_tokens=4)
    assert cut[-1].type == "response.incomplete"
    assert cut[-1].response.incomplete_details is not None
    assert cut[-1].response.incomplete_details.reason == "max_output_tokens"
    assert cut[-1].response.output_text == " the quick brown fox"
    assert [e.type for e in failed][-1] == "response.failed"
    assert failed[-1].response.error is not None
    assert failed[-1].response.error.code == "server_error"
    assert whole.status == "incomplete" and whole.usage is not None
    assert whole.usage.output_tokens == 4
