"""A real `redis-server` for the tests: started in a temp dir on a free port, no persistence (a
restart loses everything, as a cache's restart does), killed, paused and restarted on demand.
Skipped with a reason where the binary is missing; a failure under CI=true."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from .missing import missing


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        missing("redis-server is not installed (apt-get install -y redis-server)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--maxmemory-policy",
            "noeviction",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                async with self.client() as c:
                    if await c.ping():
                        return
            except (OSError, aioredis.RedisError):
                await asyncio.sleep(0.025)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    async def kill(self) -> None:
        """SIGKILL: gone at once, and (no persistence) its state with it."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel and never answered (a slow Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.terminate()
            await self.proc.wait()
            self.proc = None


@contextlib.asynccontextmanager
async def redis_running(workdir: Path) -> AsyncIterator[RedisServer]:
    os.makedirs(workdir, exist_ok=True)
    server = RedisServer(redis_binary(), workdir)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_running(tmp_path / "redis") as server:
        yield server
