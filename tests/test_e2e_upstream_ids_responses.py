"""End to end with the official openai SDK: the upstream's own x-request-id reaches the client
and the ledger; Responses streams in LiteLLM's shape (type only in the data, no [DONE]) settle as
successes; a Responses stream that ends in `response.failed` settles as an upstream error."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from meterproxy.keys import LEDGER
from meterproxy.sim.upstream import Behavior, FakeUpstream, with_failure

from .conftest import Proxy, StartProxy

MESSAGES: list[Any] = [{"role": "user", "content": "Say something about foxes"}]
INPUT = "Tell me a story"


@dataclass
class Served:
    """A simulated upstream, and the x-request-id of each reply it sent, in order."""

    fake: FakeUpstream
    url: str  # the /v1 base
    sent_ids: list[str | None] = field(default_factory=list)


Serve = Callable[[FakeUpstream], Awaitable[Served]]


async def _run(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """conftest's start_upstream, plus a record of the reply headers the fake itself sent:
    the test learns the upstream's request ids from the upstream, not from the proxy."""
    runners: list[web.AppRunner] = []

    async def _serve(fake: FakeUpstream) -> Served:
        app = fake.app()
        served = Served(fake, "")

        async def note(request: web.Request, response: web.StreamResponse) -> None:
            if request.path.startswith("/v1/") and request.method == "POST":
                served.sent_ids.append(response.headers.get("x-request-id"))

        app.on_response_prepare.append(note)
        runner, url = await _run(app)
        runners.append(runner)
        served.url = url + "/v1"
        return served

    yield _serve
    for runner in runners:
        await runner.cleanup()


async def proxy_for(start_proxy: StartProxy, url: str) -> Proxy:
    proxy: Proxy = await start_proxy({"upstreams": [{"name": "up", "url": url, "kind": "openai"}]})
    return proxy


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)


async def ledger(proxy: Proxy, count: int) -> dict[str, sqlite3.Row]:
    """The ledger's rows by request key, once `count` of them are durable (within 200 ms
    normally; polled, since the machine may be busy)."""
    path = proxy.server.runner.app[LEDGER].path
    deadline = time.monotonic() + 10
    while True:
        db = sqlite3.connect(path)
        db.row_factory = sqlite3.Row
        with db:
            rows = db.execute("SELECT * FROM requests ORDER BY id").fetchall()
        db.close()
        if len(rows) >= count or time.monotonic() > deadline:
            assert len(rows) == count
            return {row["request_id"]: row for row in rows}
        await asyncio.sleep(0.05)


async def raw_post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as r:
        return r.status, await r.read()


def data_events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE stream's `data:` lines (every event here is one line)."""
    return [
        orjson.loads(line[len(b"data: ") :])
        for line in raw.split(b"\n")
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]


# -- 1. request ids ------------------------------------------------------------------------


async def test_upstream_request_id_reaches_client_and_ledger_streamed_or_not(
    serve: Serve, start_proxy: StartProxy
) -> None:
    up = await serve(FakeUpstream("openai", {"gpt-4o": Behavior(tokens=4)}))
    proxy = await proxy_for(start_proxy, up.url)
    async with client(proxy.base_url) as c:
        raw = await c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
        reply = raw.parse()
        stream = await c.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-request-id": "client-trace-7"},
        )
        chunks = [chunk async for chunk in stream]
    assert reply.choices[0].message.content == " the quick brown fox"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (
        " the quick brown fox"
    )

    # What the upstream answered with, as it recorded it: two distinct ids of its own.
    assert len(up.sent_ids) == 2
    plain_id, streamed_id = up.sent_ids
    assert plain_id is not None and plain_id.startswith("req_")
    assert streamed_id is not None and streamed_id.startswith("req_")
    assert plain_id != streamed_id

    # The client sees the upstream's id unchanged; the proxy's key rides beside it.
    plain_key = raw.headers["x-meterproxy-request-id"]
    streamed_key = stream.response.headers["x-meterproxy-request-id"]
    assert raw.headers["x-request-id"] == plain_id
    assert reply._request_id == plain_id
    assert stream.response.headers["x-request-id"] == streamed_id
    assert plain_key.startswith("mp-") and streamed_key.startswith("mp-")
    assert len({plain_key, streamed_key, plain_id, streamed_id}) == 4

    # Upstream, the proxy sent the client's id when it had one, else its own key.
    assert [seen.headers.get("x-request-id") for seen in up.fake.seen] == [
        plain_key,
        "client-trace-7",
    ]

    rows = await ledger(proxy, 2)
    assert set(rows) == {plain_key, streamed_key}
    ids = ("request_id", "client_request_id", "upstream_request_id", "status", "outcome")
    assert tuple(rows[plain_key][k] for k in ids) == (plain_key, None, plain_id, "200", "success")
    assert tuple(rows[streamed_key][k] for k in ids) == (
        streamed_key,
        "client-trace-7",
        streamed_id,
        "200",
        "success",
    )


# -- 2. LiteLLM's Responses stream -----------------------------------------------------------

LITELLM_TYPES = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 5,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def test_litellm_responses_stream_settles_as_success_with_its_usage(
    serve: Serve, start_proxy: StartProxy
) -> None:
    up = await serve(FakeUpstream("litellm", {"sim-llama": Behavior(tokens=5)}))
    proxy = await proxy_for(start_proxy, up.url)
    body = {"model": "sim-llama", "input": INPUT, "stream": True}

    # The bytes the upstream sends for this request (its ids are a hash of the body) ...
    status, direct = await raw_post(up.url + "/responses", body)
    assert status == 200
    assert b"event:" not in direct and b"[DONE]" not in direct  # LiteLLM's shape
    # ... are the bytes the client gets through the proxy: every event, nothing added.
    status, relayed = await raw_post(proxy.base_url + "/responses", body)
    assert status == 200
    assert relayed == direct
    async with client(proxy.base_url) as c:
        stream = await c.responses.create(model="sim-llama", input=INPUT, stream=True)
        events = [event async for event in stream]
        key = stream.response.headers["x-meterproxy-request-id"]
    assert [event.type for event in events] == LITELLM_TYPES
    assert [e["type"] for e in data_events(relayed)] == LITELLM_TYPES

    completed = data_events(relayed)[-1]["response"]
    usage = completed["usage"]
    truth = up.fake.seen[-1]
    assert (usage["input_tokens"], usage["output_tokens"]) == (truth.prompt_tokens, 5)
    assert completed["output"][0]["content"][0]["text"] == " the quick brown fox jumps"

    rows = await ledger(proxy, 2)
    assert key in rows
    for row in rows.values():
        assert (
            row["endpoint"],
            row["status"],
            row["outcome"],
            row["waste_reason"],
            row["token_source"],
            row["prompt_tokens"],
            row["completion_tokens"],
        ) == ("responses", "200", "success", None, "upstream", usage["input_tokens"], 5)
    assert [(s.status, s.upstream_error) for s in proxy.settled] == [("200", None)] * 2


# -- 3. A Responses stream that fails in-band ---------------------------------------------


async def test_responses_stream_ending_in_response_failed_is_an_upstream_error(
    serve: Serve, start_proxy: StartProxy
) -> None:
    broken = with_failure(Behavior(tokens=6), "in_band_error", after=2)
    up = await serve(FakeUpstream("openai", {"gpt-4o-broken": broken}))
    proxy = await proxy_for(start_proxy, up.url)
    async with client(proxy.base_url) as c:
        stream = await c.responses.create(model="gpt-4o-broken", input=INPUT, stream=True)
        events = [event async for event in stream]
        headers = stream.response.headers
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.failed",
    ]
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.error is not None and last.response.error.code == "server_error"

    [upstream_id] = up.sent_ids
    assert headers["x-request-id"] == upstream_id
    key = headers["x-meterproxy-request-id"]

    rows = await ledger(proxy, 1)  # also waits for the settlement, which follows the stream
    [settled] = proxy.settled
    assert (settled.request_id, settled.status, settled.upstream_error) == (
        key,
        "502",
        "in_band_error",
    )
    row = rows[key]
    assert (
        row["status"],
        row["outcome"],
        row["waste_reason"],
        row["upstream_request_id"],
        row["token_source"],
    ) == ("502", "upstream_error", "upstream_error", upstream_id, "partial")
    # The failed event carries no usage: the completion is counted from the relayed text, and
    # the upstream generated (and sent) exactly that much before failing.
    assert row["completion_tokens"] == up.fake.seen[0].generated == 2
