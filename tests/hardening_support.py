"""Helpers for the hardening tests (issue 10): a raw HTTP/1.1 client for requests no library
would send, the fault-injecting upstream as a fixture factory, and probes of what the proxy
holds (its sockets, its memory)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from meterproxy.sim.faults import FaultUpstream, Script

ERROR_KEYS = {"message", "type", "param", "code"}
MESSAGES = [{"role": "user", "content": "Say something about foxes"}]


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    complete: bool  # the body arrived to its declared end
    raw_head: bytes = b""

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class RawConnection:
    """One client TCP connection that writes exactly the bytes it is given."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buffered: bytearray = field(default_factory=bytearray)

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=64 * 1024 * 1024)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout_s: float = 5.0) -> RawResponse:
        return await asyncio.wait_for(read_response(self.reader), timeout_s)

    async def closed_within(self, timeout_s: float) -> bool:
        """True if the server closes (EOF or reset) within timeout_s; reads and drops data."""

        async def drain() -> None:
            while await self.reader.read(65536):
                pass

        try:
            await asyncio.wait_for(drain(), timeout_s)
        except asyncio.TimeoutError:
            return False
        except ConnectionError:
            pass
        self.writer.close()  # the server has closed its side: close ours too
        return True

    def abort(self) -> None:
        """Close with a RST, as a client killed mid-request does."""
        if self.writer.transport.is_closing():
            return
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.transport.abort()


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), "", ""][:3]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = bytearray()
    complete = True
    try:
        if "chunked" in headers.get("transfer-encoding", ""):
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        elif "content-length" in headers:
            body += await reader.readexactly(int(headers["content-length"]))
        else:
            body += await reader.read()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        complete = False
    return RawResponse(int(status), reason, headers, bytes(body), complete, head)


def http_request(
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    extra_raw_headers: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    all_headers = {"content-type": "application/json", **(headers or {})}
    if body or method == "POST":
        all_headers["content-length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n").encode("latin-1") + extra_raw_headers + b"\r\n" + body


def port_of(url: str) -> int:
    match = re.search(r":(\d+)(?:/|$)", url)
    assert match is not None, url
    return int(match.group(1))


def assert_openai_error(body: Any, status: int, got_status: int) -> dict[str, Any]:
    """An error body in OpenAI's shape, with no trace of a Python traceback."""
    assert got_status == status, (got_status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and "Traceback" not in error["message"]
    return error


# -- the fault-injecting upstream ---------------------------------------------------------

StartFaults = Callable[..., Any]


@contextlib.asynccontextmanager
async def fault_servers() -> AsyncIterator[StartFaults]:
    """Start FaultUpstreams on ephemeral ports; all are closed on exit. (Each test module
    wraps this in its own `start_faults` fixture.)"""
    servers: list[FaultUpstream] = []

    async def _start(scripts: dict[str, Script] | None = None, **kwargs: Any) -> FaultUpstream:
        server = FaultUpstream(scripts, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.close()


def upstream_spec(url: str, models: list[str], **extra: Any) -> dict[str, Any]:
    """An upstream entry with a static model list (no discovery traffic to count)."""
    return {"name": "local", "url": url, "kind": "vllm", "models": models, **extra}


# -- probes ---------------------------------------------------------------------------------


def sockets_on_port(port: int) -> int:
    """How many sockets this process holds whose local port is `port`, the listener excluded:
    the connections a server on that port has accepted (each one file descriptor)."""
    inodes: set[str] = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":  # not LISTEN
                        inodes.add(inode)
        except FileNotFoundError:
            continue
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


def assert_stored_string(value: object, limit: int = 256) -> None:
    """A client-supplied string as the proxy may store or log it: bounded, valid UTF-8, and
    without control characters."""
    if value is None:
        return
    assert isinstance(value, str), value
    assert len(value) <= limit, f"{len(value)} characters stored"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable client bytes smuggled through
        pytest.fail(f"stored text is not valid UTF-8: {value[:60]!r}")
    controls = [c for c in value if unicodedata.category(c) == "Cc"]
    assert not controls, f"control characters stored: {controls[:5]!r}"
