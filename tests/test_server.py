"""The guarded listener, on real sockets: connections past the cap are closed as they arrive and
counted; a first request's head must arrive within its deadline (a slowloris client is cut
off); a later request's slow head is left to aiohttp's keep-alive timer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from meterproxy.server import GuardedSite

REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


@dataclass
class Listener:
    site: GuardedSite
    refused: list[int] = field(default_factory=list)
    head_timeouts: list[int] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.site.port)
        self.writers.append(writer)
        return reader, writer


Start = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def listen() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []
    listeners: list[Listener] = []

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def start(
        *, max_connections: int = 100, headers_s: float = 10.0, keepalive_s: float = 10.0
    ) -> Listener:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(
            app, handler_cancellation=True, keepalive_timeout=keepalive_s, access_log=None
        )
        await runner.setup()
        runners.append(runner)
        refused: list[int] = []
        head_timeouts: list[int] = []
        site = GuardedSite(
            runner,
            "127.0.0.1",
            0,
            max_connections=max_connections,
            headers_s=headers_s,
            on_refused=lambda: refused.append(1),
            on_head_timeout=lambda: head_timeouts.append(1),
        )
        await site.start()
        listener = Listener(site, refused, head_timeouts)
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        for writer in listener.writers:
            writer.close()
    for runner in runners:
        await runner.cleanup()


async def until(condition: Callable[[], bool], timeout_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One request on an open connection, and its status line."""
    writer.write(REQUEST)
    await writer.drain()
    return await asyncio.wait_for(read_response(reader), 1.0)


async def read_response(reader: asyncio.StreamReader) -> bytes:
    status = await reader.readline()
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2)  # "ok"
    return status


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1024), 1.0) == b""
    except ConnectionResetError:  # an abort: RST rather than FIN
        return True


async def test_connections_past_the_cap_are_closed_at_once_and_counted(listen: Start) -> None:
    server: Listener = await listen(max_connections=2)
    held = [await server.connect(), await server.connect()]
    await until(lambda: server.site.open_connections == 2)
    extra_reader, _ = await server.connect()
    assert await closed_by_server(extra_reader)
    assert server.refused == [1] and server.site.open_connections == 2
    # The held connections are served as usual.
    assert await answered(*held[0]) == b"HTTP/1.1 200 OK\r\n"
    # One leaves: its slot is free again.
    held[1][1].close()
    await until(lambda: server.site.open_connections == 1)
    fresh = await server.connect()
    assert await answered(*fresh) == b"HTTP/1.1 200 OK\r\n"
    assert server.refused == [1] and server.site.open_connections == 2
    assert server.head_timeouts == []


async def test_a_first_head_sent_a_byte_at_a_time_is_cut_off_at_its_deadline(
    listen: Start,
) -> None:
    server: Listener = await listen(headers_s=0.15)
    reader, writer = await server.connect()
    started = time.monotonic()

    async def slowloris() -> None:
        for byte in REQUEST[:-2]:  # never the blank line that ends the head
            writer.write(bytes([byte]))
            await asyncio.sleep(0.01)

    trickle = asyncio.create_task(slowloris())
    assert await closed_by_server(reader)
    elapsed = time.monotonic() - started
    trickle.cancel()
    await asyncio.gather(trickle, return_exceptions=True)
    assert 0.1 <= elapsed < 0.8
    assert server.head_timeouts == [1] and server.refused == []
    await until(lambda: server.site.open_connections == 0)


@pytest.mark.parametrize(
    "parts",
    [
        [REQUEST],
        [REQUEST[:-1], REQUEST[-1:]],  # the head's end split across two reads
        [REQUEST[:-3], REQUEST[-3:]],
    ],
    ids=["whole", "split-1", "split-3"],
)
async def test_a_first_head_in_time_disarms_the_deadline(listen: Start, parts: list[bytes]) -> None:
    server: Listener = await listen(headers_s=0.15)
    reader, writer = await server.connect()
    for part in parts:
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.02)
    assert await asyncio.wait_for(read_response(reader), 1.0) == b"HTTP/1.1 200 OK\r\n"
    await asyncio.sleep(0.25)  # past the deadline: the connection stays
    assert await answered(reader, writer) == b"HTTP/1.1 200 OK\r\n"
    assert server.head_timeouts == []


async def test_a_slow_later_head_is_the_keepalive_timers_not_the_guards(
    listen: Start,
) -> None:
    server: Listener = await listen(headers_s=0.1, keepalive_s=0.6)
    reader, writer = await server.connect()
    assert await answered(reader, writer) == b"HTTP/1.1 200 OK\r\n"
    writer.write(REQUEST[:10])
    await asyncio.sleep(0.25)  # well past headers_s, within the keep-alive time
    writer.write(REQUEST[10:])
    assert await asyncio.wait_for(read_response(reader), 1.0) == b"HTTP/1.1 200 OK\r\n"
    # A later head that never ends is closed by aiohttp's keep-alive timer, not counted.
    started = time.monotonic()
    writer.write(REQUEST[:10])
    assert await closed_by_server(reader)
    assert time.monotonic() - started >= 0.4
    assert server.head_timeouts == []
