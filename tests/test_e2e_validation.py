"""Request validation, fuzzed end to end: hypothesis builds bodies with fields of every type,
sends them through the real proxy to the vLLM fake, and checks the one rule of issue 10 —
each answer is either the forwarded request or a 400 in OpenAI's shape naming the `param`;
never a 500, never a traceback, and nothing reaches the upstream unless it is well typed.

The proxy runs on its own event loop in a thread, so hypothesis drives it with plain
blocking HTTP from the test's thread.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from meterproxy import config
from meterproxy.app import RunningServer, create_app, start, stop
from meterproxy.sim.upstream import Behavior, FakeUpstream
from meterproxy.tokens import TokenCounter

ENDPOINTS = {
    "chat_completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
}
# The fields each endpoint types, as OpenAI's API does (and no others: the rest pass through).
FIELDS = {
    "chat_completions": ("stream", "stream_options", "n", "max_tokens", "max_completion_tokens"),
    "completions": ("stream", "stream_options", "n", "best_of", "max_tokens"),
    "responses": ("stream", "max_output_tokens"),
}
POSITIVE = ("n", "best_of")
NON_NEGATIVE = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass
class Live:
    port: int
    fake: FakeUpstream
    settled: list[Any] = field(default_factory=list)  # settled requests, as the sinks see them
    sent: int = 0


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("intake")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="proxy-loop", daemon=True)
    thread.start()
    fake = FakeUpstream("vllm", {"sim-llama": Behavior(tokens=3)})
    settled: list[Any] = []

    async def up() -> tuple[web.AppRunner, RunningServer]:
        runner = web.AppRunner(fake.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        settings = config.parse(
            {
                "server": {"unready_delay_s": 0, "drain_timeout_s": 2},
                "ledger": {"path": str(tmp / "ledger.db")},
                "quota": {"state_path": str(tmp / "quota.db")},
                "upstreams": [
                    {"name": "local", "url": url, "kind": "vllm", "models": ["sim-llama"]}
                ],
            },
            {},
        )
        app = create_app(
            settings,
            registry=CollectorRegistry(),
            sinks=[settled.append],
            tokens=TokenCounter(None),
        )
        return runner, await start(app, "127.0.0.1", 0)

    started: Future[tuple[web.AppRunner, RunningServer]] = asyncio.run_coroutine_threadsafe(
        up(), loop
    )
    runner, server = started.result(30)
    try:
        yield Live(server.port, fake, settled)
    finally:

        async def down() -> None:
            await stop(server)
            await runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# -- bodies -------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "1", "true", "yes", "5000", "5000.0", "null", "\x00"]),
    st.text(max_size=8),
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_stream_options = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "include_usage": st.one_of(st.booleans(), st.none(), _json),
            "continuous_usage_stats": st.booleans(),
        },
    ),
    _json,
)
_VALUES = {
    "stream": st.one_of(st.booleans(), _json),
    "stream_options": _stream_options,
    "n": st.one_of(st.integers(1, 3), _json),
    "best_of": st.one_of(st.integers(1, 3), _json),
    "max_tokens": st.one_of(st.integers(0, 16), _json),
    "max_completion_tokens": st.one_of(st.integers(0, 16), _json),
    "max_output_tokens": st.one_of(st.integers(0, 16), _json),
}


def base(endpoint: str) -> dict[str, Any]:
    """A valid body for the endpoint, before any field under test."""
    if endpoint == "chat_completions":
        return {"model": "sim-llama", "messages": [{"role": "user", "content": "Say hi"}]}
    return {"model": "sim-llama", "prompt" if endpoint == "completions" else "input": "Say hi"}


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    endpoint = draw(st.sampled_from(sorted(ENDPOINTS)))
    body = base(endpoint)
    for name in FIELDS[endpoint]:
        if draw(st.booleans()):
            body[name] = draw(_VALUES[name])
    if draw(st.booleans()):
        body["x_passthrough"] = draw(_json)  # an unknown field: never the proxy's business
    return endpoint, body


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def judge(body: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(params that must be refused, params that may be refused) by OpenAI's rules."""
    must: set[str] = set()
    may: set[str] = set()
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        must.add("stream")
    for name in POSITIVE:
        if name in body and body[name] is not None:
            value = body[name]
            if not is_int(value) or value < 1:
                must.add(name)
            elif value > 128:
                may.add(name)
    for name in NON_NEGATIVE:
        if name in body and body[name] is not None:
            value = body[name]
            if not is_int(value) or value < 0:
                must.add(name)
            elif value > 2**31:
                may.add(name)
    if is_int(body.get("n")) and is_int(body.get("best_of")) and body["best_of"] < body["n"]:
        may.update(("n", "best_of"))
    options = body.get("stream_options")
    if "stream_options" in body and options is not None:
        if not isinstance(options, dict):
            must.add("stream_options")
        else:
            usage = options.get("include_usage")
            if usage is not None and not isinstance(usage, bool):
                must.add("stream_options")
        if body.get("stream") is not True:  # OpenAI: only allowed when streaming
            may.add("stream_options")
    return must, may


def send(live: Live, path: str, raw: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    try:
        conn.request("POST", path, body=raw, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_settled(live: Live) -> None:
    for _ in range(200):
        if len(live.settled) >= live.sent:
            break
        threading.Event().wait(0.005)
    assert len(live.settled) == live.sent, "a request did not settle exactly once"


@settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=cases())
def test_every_body_is_forwarded_or_a_400_naming_the_param(
    live: Live, case: tuple[str, dict[str, Any]]
) -> None:
    endpoint, body = case
    must, may = judge(body)
    seen_before = len(live.fake.seen)
    payload = json.dumps(body).encode()  # not orjson: it cannot write integers past 64 bits
    live.sent += 1
    status, raw = send(live, ENDPOINTS[endpoint], payload)
    forwarded = len(live.fake.seen) - seen_before
    assert b"Traceback" not in raw
    assert status in (200, 400), (status, raw[:300], body)
    if status == 200:
        assert not must, f"forwarded although {sorted(must)} are not of OpenAI's types: {body}"
        assert forwarded == 1
    else:
        answer = orjson.loads(raw)
        assert set(answer) == {"error"}
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        named = str(error["param"]).split(".")[0].split("[")[0]
        assert must or may, f"refused a well-typed body: {error} {body}"
        assert named in must | may, f"param {error['param']!r}, expected one of {must | may}"
        assert forwarded == 0  # refused before any upstream byte
    wait_settled(live)
    assert live.settled[-1].status == str(status)


@pytest.mark.parametrize(
    ("endpoint", "field", "value"),
    [
        ("chat_completions", "stream", 1),
        ("chat_completions", "stream", "yes"),
        ("completions", "n", 2.0),
        ("completions", "best_of", "3"),
        ("chat_completions", "max_completion_tokens", 5000.0),
        ("responses", "max_output_tokens", "5000"),
        ("chat_completions", "stream_options", "on"),
    ],
)
def test_known_bad_fields_are_refused(live: Live, endpoint: str, field: str, value: Any) -> None:
    body = {**base(endpoint), field: value}
    if field == "stream_options":
        body["stream"] = True
    seen_before = len(live.fake.seen)
    live.sent += 1
    status, raw = send(live, ENDPOINTS[endpoint], orjson.dumps(body))
    assert status == 400, raw[:300]
    assert orjson.loads(raw)["error"]["param"] == field
    assert len(live.fake.seen) == seen_before
    wait_settled(live)
