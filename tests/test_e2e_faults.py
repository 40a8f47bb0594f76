"""Every fault the proxy must survive: bad input, upstream failures, disconnects.

Each test also checks the request settled exactly once.
"""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import openai
import pytest

from meterproxy.sim.upstream import Behavior, with_failure

from .conftest import Proxy, StartProxy, StartUpstream, Upstream

MESSAGES = [{"role": "user", "content": "Say something about foxes"}]
ERROR_KEYS = {"message", "type", "param", "code"}


async def start_one(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    behavior: Behavior,
    *,
    flavor: str = "vllm",
    kind: str | None = None,
    timeouts: dict[str, float] | None = None,
    environ: dict[str, str] | None = None,
    key_env: str | None = None,
) -> tuple[Upstream, Proxy]:
    up: Upstream = await start_upstream({"sim-llama": behavior}, flavor=flavor)
    spec: dict[str, object] = {"name": "local", "url": up.url, "kind": kind or flavor}
    if timeouts:
        spec["timeouts"] = timeouts
    if key_env:
        spec["api_key_env"] = key_env
    proxy: Proxy = await start_proxy({"upstreams": [spec]}, environ=environ)
    return up, proxy


async def post(
    http: aiohttp.ClientSession, proxy: Proxy, data: bytes, path: str = "/chat/completions"
) -> tuple[int, dict[str, object]]:
    async with http.post(
        proxy.base_url + path, data=data, headers={"content-type": "application/json"}
    ) as response:
        body = await response.json()
        return response.status, body


def assert_openai_error(body: dict[str, object], code: str | None) -> dict[str, object]:
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_KEYS
    assert error["code"] == code
    assert "Traceback" not in str(error["message"])
    return error


async def test_malformed_json_is_400(proxy: Proxy, http: aiohttp.ClientSession) -> None:
    status, body = await post(http, proxy, b'{"model": "sim-llama", "messages": [')
    assert status == 400
    error = assert_openai_error(body, "invalid_json")
    assert error["type"] == "invalid_request_error"
    [record] = proxy.settled
    assert record.status == "400" and record.model == "_none"


async def test_missing_and_unknown_models_are_404(proxy: Proxy) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as caught:
            await c.chat.completions.create(model="made-up-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert "made-up-model" in caught.value.message
    # A model a client made up creates no series.
    assert "made-up-model" not in proxy.server.runner.app and all(
        "made-up-model" not in str(s.labels) for m in proxy.registry.collect() for s in m.samples
    )
    assert len(proxy.settled) == 1


async def test_body_over_the_limit_is_413(
    start_upstream: StartUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    up = await start_upstream()
    proxy = await start_proxy(
        {
            "upstreams": [{"name": "local", "url": up.url}],
            "server": {"max_body_bytes": 1000, "unready_delay_s": 0},
        }
    )
    status, body = await post(
        http, proxy, b'{"model": "sim-llama", "prompt": "' + b"x" * 5000 + b'"}', "/completions"
    )
    assert status == 413
    error = assert_openai_error(body, "payload_too_large")
    assert "1,000 bytes" in str(error["message"])
    assert up.fake.seen == []


async def test_unreachable_upstream_is_502(start_proxy: StartProxy) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy: Proxy = await start_proxy(
        {
            "upstreams": [
                {"name": "gone", "url": f"http://127.0.0.1:{port}/v1", "models": ["sim-llama"]}
            ]
        }
    )
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as caught:
            await c.chat.completions.create(model="sim-llama", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"
    assert proxy.sample("meterproxy_upstream_errors_total", upstream="gone", kind="connect") == 1
    assert [r.status for r in proxy.settled] == ["502"]


async def test_upstream_that_never_answers_is_504(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    _up, proxy = await start_one(
        start_upstream, start_proxy, with_failure(Behavior(), "hang"), timeouts={"first_byte": 0.3}
    )
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as caught:
            await c.chat.completions.create(model="sim-llama", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert "0.3s" in caught.value.message
    assert (
        proxy.sample(
            "meterproxy_upstream_errors_total", upstream="local", kind="first_byte_timeout"
        )
        == 1
    )


async def test_html_error_page_becomes_a_clear_502(
    start_upstream: StartUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    _, proxy = await start_one(
        start_upstream, start_proxy, with_failure(Behavior(), "http_500_html")
    )
    status, body = await post(http, proxy, b'{"model": "sim-llama", "messages": []}')
    assert status == 502
    error = assert_openai_error(body, "upstream_bad_response")
    assert "HTTP 500" in str(error["message"]) and "<html>" not in str(error["message"])
    assert proxy.sample("meterproxy_upstream_errors_total", upstream="local", kind="http_5xx") == 1


async def test_an_upstream_error_event_passes_through_with_its_status(
    start_upstream: StartUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # LiteLLM answers a stream whose engine failed before the first token with HTTP 503 and an
    # error event, no [DONE] (tests/data/litellm/chat_stream_usage_inband0.sse).
    up, proxy = await start_one(
        start_upstream,
        start_proxy,
        with_failure(Behavior(), "in_band_error", after=0),
        flavor="litellm",
        kind="openai",
    )
    body = b'{"model": "sim-llama", "messages": [], "stream": true}'
    headers = {"content-type": "application/json"}
    async with http.post(up.url + "/chat/completions", data=body, headers=headers) as r:
        direct = (r.status, r.content_type, await r.read())
    async with http.post(proxy.base_url + "/chat/completions", data=body, headers=headers) as r:
        proxied = (r.status, r.content_type, await r.read())
    assert direct[0] == 503 and direct[2].startswith(b'data: {"error"')
    assert proxied == direct
    [record] = proxy.settled
    assert (record.status, record.upstream_error) == ("503", "http_5xx")


async def test_upstream_json_errors_pass_through_with_their_status(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    _, proxy = await start_one(start_upstream, start_proxy, with_failure(Behavior(), "http_400"))
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as caught:
            await c.chat.completions.create(model="sim-llama", messages=MESSAGES)
    assert "maximum context length" in caught.value.message
    assert [r.status for r in proxy.settled] == ["400"]
    assert proxy.settled[0].usage.known is False


async def test_upstream_401_is_a_502_that_never_echoes_the_key(
    start_upstream: StartUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    _, proxy = await start_one(
        start_upstream,
        start_proxy,
        with_failure(Behavior(), "http_401"),
        environ={"UP_KEY": "sk-upstream-SECRET"},
        key_env="UP_KEY",
    )
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as caught:
            await c.chat.completions.create(model="sim-llama", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_auth_rejected"
    body = str(caught.value.body)
    assert "SECRET" not in body and "sk-ups" not in body and "Incorrect API key" not in body
    assert "sk-ups" not in caplog.text
    assert (
        proxy.sample("meterproxy_upstream_errors_total", upstream="local", kind="auth_rejected")
        == 1
    )


async def wait_for(predicate: object, timeout: float = 2.0) -> float:
    start = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_disconnect_before_first_token_cancels_the_upstream(
    start_upstream: StartUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    up, proxy = await start_one(start_upstream, start_proxy, with_failure(Behavior(), "hang"))
    body = {"model": "sim-llama", "messages": MESSAGES, "stream": True}
    task = asyncio.create_task(http.post(proxy.base_url + "/chat/completions", json=body))
    await wait_for(lambda: len(up.fake.seen) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    left_at = time.monotonic()
    await wait_for(lambda: up.fake.seen[0].cancelled, timeout=1.0)
    assert time.monotonic() - left_at < 1.0
    await wait_for(lambda: len(proxy.settled) == 1)
    [record] = proxy.settled
    assert (record.status, record.waste_reason) == ("499", "client_disconnect")
    assert record.usage.source.value == "partial" and record.usage.completion == 0
    assert proxy.sample("meterproxy_inflight_requests", upstream="local") == 0


async def test_disconnect_mid_stream_cancels_upstream_and_counts_streamed_tokens(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    up, proxy = await start_one(start_upstream, start_proxy, Behavior(tokens=200, pace_s=0.02))
    received = 0
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            proxy.base_url + "/chat/completions",
            json={"model": "sim-llama", "messages": MESSAGES, "stream": True},
        )
        async for line in response.content:
            if line.startswith(b'data: {"id"') and b'"content":" ' in line:
                received += 1
            if received == 5:
                break
        response.close()  # the client hangs up mid-stream
    closed_at = time.monotonic()
    await wait_for(lambda: up.fake.seen[0].cancelled, timeout=1.0)
    assert time.monotonic() - closed_at < 1.0
    await wait_for(lambda: len(proxy.settled) == 1)
    [record] = proxy.settled
    assert (record.status, record.waste_reason) == ("499", "client_disconnect")
    assert record.usage.source.value == "partial" and record.estimated
    # The proxy counted what it relayed: at least what the client read, far less than 200.
    assert 5 <= (record.usage.completion or 0) < 50
    assert (
        proxy.sample(
            "meterproxy_wasted_tokens_total",
            model="sim-llama",
            tenant="anonymous",
            reason="client_disconnect",
        )
        == record.usage.completion
    )
    assert proxy.total("meterproxy_tokens_total", type="completion") == record.usage.completion


@pytest.mark.parametrize(
    ("flavor", "failure", "kind"),
    [
        ("vllm", "reset", "reset"),
        ("trtllm", "eof", "eof_without_done"),
        ("vllm", "in_band_error", "in_band_error"),
        ("trtllm", "in_band_error", "in_band_error"),
    ],
)
async def test_upstream_breaking_off_is_never_a_success(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    flavor: str,
    failure: str,
    kind: str,
) -> None:
    up, proxy = await start_one(
        start_upstream,
        start_proxy,
        with_failure(Behavior(tokens=10), failure, after=4),
        flavor=flavor,
    )
    body = {"model": "sim-llama", "messages": MESSAGES, "stream": True}
    received = b""
    async with http.post(proxy.base_url + "/chat/completions", json=body) as response:
        try:
            async for chunk in response.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError:
            assert failure == "reset"  # the reset is mirrored, not smoothed into a clean end
        else:
            assert failure != "reset"
    direct = b""
    async with http.post(up.url + "/chat/completions", json=body) as response:
        try:
            async for chunk in response.content.iter_any():
                direct += chunk
        except aiohttp.ClientPayloadError:
            pass
    assert received == direct  # the client sees what it would see directly, nothing invented
    if flavor == "trtllm":
        assert b"[DONE]" not in received
    await wait_for(lambda: len(proxy.settled) == 1)
    [record] = proxy.settled
    assert (record.status, record.upstream_error, record.waste_reason) == (
        "502",
        kind,
        "upstream_error",
    )
    assert record.usage.completion == 4
    assert (
        proxy.sample(
            "meterproxy_wasted_tokens_total",
            model="sim-llama",
            tenant="anonymous",
            reason="upstream_error",
        )
        == 4
    )
    assert proxy.sample("meterproxy_upstream_errors_total", upstream="local", kind=kind) == 1
    assert proxy.total("meterproxy_requests_total", status="200") == 0


async def test_idle_upstream_mid_stream_times_out(
    start_upstream: StartUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    _, proxy = await start_one(
        start_upstream,
        start_proxy,
        with_failure(Behavior(tokens=10), "hang_mid", after=3),
        timeouts={"idle": 0.3},
    )
    body = {"model": "sim-llama", "messages": MESSAGES, "stream": True}
    async with http.post(proxy.base_url + "/chat/completions", json=body) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await wait_for(lambda: len(proxy.settled) == 1)
    assert proxy.settled[0].upstream_error == "idle_timeout"
    assert proxy.settled[0].usage.completion == 3


async def test_upstream_without_usage_is_estimated_with_tiktoken(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    _, proxy = await start_one(
        start_upstream, start_proxy, Behavior(tokens=9, usage=False), flavor="vllm"
    )
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as c:
        reply = await c.chat.completions.create(model="sim-llama", messages=MESSAGES)
        stream = await c.chat.completions.create(model="sim-llama", messages=MESSAGES, stream=True)
        async for _ in stream:
            pass
    assert reply.usage is None
    for record in proxy.settled:
        assert record.usage.source.value == "estimate" and record.estimated
        # Each simulated token is one cl100k token; the chat prompt is framed like OpenAI's:
        # 3 per message + "user" (1) + "Say something about foxes" (5) + 3 to prime the reply.
        assert record.usage.completion == 9
        assert record.usage.prompt == 3 + 1 + 5 + 3
    assert proxy.sample("meterproxy_token_estimates_total", model="sim-llama") == 2


async def test_a_kept_connection_the_upstream_dropped_is_tried_again_on_a_new_one(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An upstream that announces keep-alive but drops the kept connection when the next
    request comes (llama.cpp's habit): that request, which no live server read, goes out again
    on a fresh connection; a fresh connection's failure is final."""
    answer = (
        b'{"id":"c","object":"chat.completion","created":1,"model":"sim-llama","choices":[{'
        b'"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
    )
    models = b'{"object":"list","data":[{"id":"sim-llama","object":"model"}]}'
    mode = {"answer_first": True}
    connections = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = sum(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                payload = models if head.startswith(b"GET /v1/models ") else answer
                if payload is answer:
                    served += 1
                    if served > 1 or not mode["answer_first"]:
                        break  # dropped without a word, the request read
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Connection: keep-alive\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(payload), payload)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await start_proxy(
        {
            "upstreams": [
                {
                    "name": "local",
                    "url": f"http://127.0.0.1:{port}/v1",
                    "kind": "generic",
                }
            ]
        }
    )
    body = {"model": "sim-llama", "messages": MESSAGES}
    try:
        for _ in range(2):  # the second goes out on the kept connection, which is dropped
            async with http.post(proxy.base_url + "/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
        assert proxy.sample("meterproxy_upstream_retries_total", upstream="local") == 1
        mode["answer_first"] = False
        for writer in connections:
            writer.close()  # nothing kept: the next request goes out on a fresh connection
        await asyncio.sleep(0.1)
        async with http.post(proxy.base_url + "/chat/completions", json=body) as r:
            assert r.status == 502
        assert proxy.sample("meterproxy_upstream_retries_total", upstream="local") == 1
        await wait_for(lambda: len(proxy.settled) == 3)
        assert [s.status for s in proxy.settled] == ["200", "200", "502"]
    finally:
        server.close()
