"""The listening socket, guarded against clients that hold connections without using them.

aiohttp's own keep-alive timer closes idle connections (`server.timeouts.keepalive_s`). What it
lacks is added here, by a thin protocol around each of its connection handlers: a cap on the
connections held at once (`server.max_connections`; more are closed as they arrive, counted),
and a deadline for the first request's line and headers (`server.timeouts.headers_s`), so a
slowloris client cannot hold a socket by sending a byte at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

_HEAD_END = (b"\r\n\r\n", b"\n\n")


class _Guard(asyncio.Protocol):
    """Delegates everything to aiohttp's handler; adds the cap and the header deadline."""

    __slots__ = ("_counted", "_inner", "_site", "_tail", "_timer", "_transport")

    def __init__(self, inner: Any, site: GuardedSite) -> None:
        self._inner = inner
        self._site = site
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._tail = b""  # the last bytes seen, while waiting for the end of the first head
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self._site
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
        if site.open_connections >= site.max_connections:
            site.on_refused()
            transport.abort()
            return
        site.open_connections += 1
        self._counted = True
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(site.headers_s, self._head_timeout)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if any(end in seen for end in _HEAD_END):
                self._timer.cancel()
                self._timer = None
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self._counted:
            return None
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self._site.open_connections -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _head_timeout(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._site.on_head_timeout()
            self._transport.abort()


class GuardedSite(web.TCPSite):
    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        headers_s: float,
        on_refused: Callable[[], None],
        on_head_timeout: Callable[[], None],
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, host, port, reuse_address=True, reuse_port=reuse_port)
        self.max_connections = max_connections
        self.headers_s = headers_s
        self.on_refused = on_refused
        self.on_head_timeout = on_head_timeout
        self.open_connections = 0

    async def start(self) -> None:
        self._runner._reg_site(self)  # BaseSite.start, without TCPSite's unguarded listener
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Guard(server(), self),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
