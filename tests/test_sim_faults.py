"""The fault-injecting upstream itself: a normal answer is vLLM's bytes, and each fault does
exactly what it says, seen from a raw socket and from aiohttp's client."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from meterproxy.sim.faults import Fault, FaultUpstream, Script
from meterproxy.sim.upstream import Behavior, FakeUpstream

from .hardening_support import (
    MESSAGES,
    RawConnection,
    StartFaults,
    fault_servers,
    http_request,
    port_of,
)


@pytest.fixture
async def start_faults() -> AsyncIterator[StartFaults]:
    async with fault_servers() as start:
        yield start


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": MESSAGES, **extra}


async def raw_post(faults: FaultUpstream, body: dict[str, object]) -> RawConnection:
    conn = await RawConnection.open(faults.port)
    await conn.send(http_request("POST", "/v1/chat/completions", orjson.dumps(body)))
    return conn


async def test_a_normal_stream_is_vllms_bytes(start_faults: StartFaults) -> None:
    faults = await start_faults({"sim-llama": Script(tokens=8)})
    fake = FakeUpstream("vllm", {"sim-llama": Behavior(tokens=8)})
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    body = chat("sim-llama", stream=True, stream_options={"include_usage": True}, max_tokens=6)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(faults.url + "/chat/completions", json=body) as r:
                ours, content_type = await r.read(), r.headers["content-type"]
            async with http.post(fake_url + "/chat/completions", json=body) as r:
                theirs = await r.read()
    finally:
        await runner.cleanup()
    assert ours == theirs  # byte for byte what the shared vLLM fake sends
    assert content_type == "text/event-stream; charset=utf-8"
    [exchange] = faults.exchanges
    assert exchange.generated == 6 and exchange.finished
    assert bytes(exchange.sent) == ours and exchange.sent_bytes == len(ours)
    assert exchange.prompt_tokens == fake.seen[0].prompt_tokens
    assert exchange.json == body and exchange.target == "/v1/chat/completions"


async def test_keep_alive_and_non_streamed_answers(start_faults: StartFaults) -> None:
    faults = await start_faults({"m": Script(tokens=5, usage={"completion_tokens": 2**63})})
    conn = await raw_post(faults, chat("m"))
    first = await conn.response()
    await conn.send(http_request("GET", "/v1/models"))  # same connection
    models = await conn.response()
    conn.close()
    answer = first.json()
    assert first.status == 200 and answer["usage"]["completion_tokens"] == 2**63
    assert answer["choices"][0]["message"]["content"] == " the quick brown fox jumps"
    assert [m["id"] for m in models.json()["data"]] == ["m"]
    assert faults.connections_total == 1 and faults.exchanges[0].generated == 5


async def test_usage_override_in_the_stream(start_faults: StartFaults) -> None:
    faults = await start_faults({"m": Script(tokens=3, usage={"prompt_tokens": 2**63})})
    conn = await raw_post(faults, chat("m", stream=True, stream_options={"include_usage": True}))
    response = await conn.response()
    conn.close()
    assert b'"usage":{"prompt_tokens":9223372036854775808,' in response.body
    assert response.body.endswith(b"data: [DONE]\n\n") and response.complete


async def test_reset_sends_a_rst_after_the_given_tokens(start_faults: StartFaults) -> None:
    faults = await start_faults({"m": Script(fault=Fault.RESET, tokens=10, after=4, pace_s=0.01)})
    received = b""
    async with aiohttp.ClientSession() as http:
        async with http.post(faults.url + "/chat/completions", json=chat("m", stream=True)) as r:
            with pytest.raises(aiohttp.ClientPayloadError) as caught:
                async for chunk in r.content.iter_any():
                    received += chunk
    assert "reset" in repr(caught.value).lower()
    [exchange] = faults.exchanges
    assert exchange.generated == 4 and exchange.fault_ns is not None and not exchange.finished
    assert received == bytes(exchange.sent) and received.count(b"data: ") == 5  # role + 4


@pytest.mark.parametrize("fault", [Fault.STALL, Fault.BAD_FRAMING])
async def test_stall_and_bad_framing_then_wait_for_the_peer(
    start_faults: StartFaults, fault: Fault
) -> None:
    faults = await start_faults({"m": Script(fault=fault, tokens=10, after=3, pace_s=0.02)})
    conn = await raw_post(faults, chat("m", stream=True))
    assert not await conn.closed_within(0.5)  # silent, never closes on its own
    [exchange] = faults.exchanges
    assert exchange.generated == 3 and exchange.peer_closed_ns is None
    conn.close()
    closed_at = time.monotonic_ns()
    for _ in range(100):
        if exchange.peer_closed_ns is not None:
            break
        await asyncio.sleep(0.01)
    assert exchange.peer_closed_ns is not None and exchange.peer_closed_ns >= closed_at
    # The payload sent: the role chunk, three tokens, and for a stall half of a fourth event.
    assert exchange.sent.count(b"data: ") == 4 + (fault is Fault.STALL)
    if fault is Fault.STALL:
        assert re.search(rb'\n\ndata: \{"id":"chatcmpl-[0-9a-f]{32}$', exchange.sent)
    else:
        assert exchange.sent.endswith(b"\n\n")


async def test_bad_framing_on_the_wire_and_in_aiohttp(start_faults: StartFaults) -> None:
    faults = await start_faults({"m": Script(fault=Fault.BAD_FRAMING, tokens=10, after=2)})
    conn = await raw_post(faults, chat("m", stream=True))
    wire = b""
    while b"zz\r\n" not in wire:
        wire += await asyncio.wait_for(conn.reader.read(65536), 2)
    conn.close()
    assert wire.endswith(b"0\r\n\r\n") is False and b"\r\nzz\r\ndata: not a chunk\r\n" in wire
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientResponseError, match="Invalid character in chunk size"):
            async with http.post(
                faults.url + "/chat/completions", json=chat("m", stream=True)
            ) as r:
                await asyncio.wait_for(r.read(), 2)


@pytest.mark.parametrize("then", ["done", "close", "stall"])
async def test_huge_line(start_faults: StartFaults, then: str) -> None:
    size = 3 * 1024 * 1024
    script = Script(fault=Fault.HUGE_LINE, tokens=5, after=2, line_bytes=size, then=then)
    faults = await start_faults({"m": script})
    conn = await raw_post(faults, chat("m", stream=True))
    if then == "stall":
        assert not await conn.closed_within(0.5)
        conn.close()
        [exchange] = faults.exchanges
        assert exchange.sent_bytes > size and exchange.generated == 2
        return
    response = await conn.response()
    conn.close()
    [exchange] = faults.exchanges
    assert response.complete and exchange.finished
    line = response.body.split(b"\n\n")[3]  # role, two tokens, then the line
    assert line.startswith(b"data: xxx") and len(line) == size + 6 and b"\n" not in line
    assert exchange.sent_bytes == len(response.body)
    assert len(exchange.sent) < 2048 + 1024  # the line is counted in full, kept in part
    if then == "done":
        assert exchange.generated == 5 and response.body.endswith(b"data: [DONE]\n\n")
    else:
        assert exchange.generated == 2 and response.body.endswith(b"x")


async def test_redirect_names_its_own_address(start_faults: StartFaults) -> None:
    faults = await start_faults({"m": Script(fault=Fault.REDIRECT, status=308)})
    conn = await raw_post(faults, chat("m"))
    response = await conn.response()
    conn.close()
    assert response.status == 308
    assert response.headers["location"] == f"http://{faults.address}/internal/v1/chat/completions"
    assert faults.address == f"127.0.0.1:{port_of(faults.url)}"


async def test_echo_auth_repeats_the_key_in_body_and_header(start_faults: StartFaults) -> None:
    faults = await start_faults({"m": Script(fault=Fault.ECHO_AUTH, status=500)})
    async with aiohttp.ClientSession() as http:
        async with http.post(
            faults.url + "/chat/completions",
            json=chat("m"),
            headers={"Authorization": "Bearer sk-upstream-123"},
        ) as r:
            status, body, header = r.status, await r.json(), r.headers["x-echo-authorization"]
    assert status == 500 and header == "Bearer sk-upstream-123"
    assert "Bearer sk-upstream-123" in body["error"]["message"]


async def test_headers_delay_and_choose(start_faults: StartFaults) -> None:
    def choose(exchange: object) -> Script:
        return Script(tokens=2, headers_delay_s=0.3)

    faults = await start_faults({}, choose=choose)
    started = time.monotonic()
    conn = await raw_post(faults, chat("anything", max_tokens=1))
    response = await conn.response()
    conn.close()
    assert time.monotonic() - started >= 0.3
    assert response.json()["usage"]["completion_tokens"] == 1
    assert faults.exchanges[0].model == "anything"
    assert faults.by_request_id() == {}


async def test_request_id_and_non_streamed_fault(start_faults: StartFaults) -> None:
    faults = await start_faults({"m": Script(fault=Fault.RESET)})
    conn = await raw_post(faults, chat("m"))
    response = await conn.response()
    conn.close()
    assert response.status == 200 and not response.complete  # half a JSON body, then a RST
    conn = await RawConnection.open(faults.port)
    await conn.send(
        http_request(
            "POST",
            "/v1/chat/completions",
            orjson.dumps(chat("m", stream=True)),
            {"x-request-id": "r-1"},
        )
    )
    await conn.closed_within(2)
    assert faults.by_request_id()["r-1"].generated == 2
    assert faults.open_connections == 0 and faults.connections_total == 2


async def test_tail_delay_and_on_headers(start_faults: StartFaults) -> None:
    moments: list[int] = []
    script = Script(tokens=2, tail_delay_s=0.2, on_headers=lambda: moments.append(1))
    faults = await start_faults({"m": script})
    conn = await raw_post(faults, chat("m", stream=True))
    wire = b""
    while b"data: [DONE]\n\n" not in wire:
        wire += await asyncio.wait_for(conn.reader.read(65536), 2)
    done_at = time.monotonic()
    assert wire.startswith(b"HTTP/1.1 200 OK\r\n") and moments == [1]
    assert not wire.endswith(b"0\r\n\r\n")  # the body's end is held back
    rest = await asyncio.wait_for(conn.reader.readuntil(b"0\r\n\r\n"), 2)
    assert rest.endswith(b"0\r\n\r\n") and time.monotonic() - done_at >= 0.15
    conn.close()
