"""A real headless Chromium for page tests, driven over the DevTools protocol (its websocket,
with aiohttp): open a page, evaluate script in it, take a screenshot. Missing chromium skips a
test with the reason, except under CI=true, where it fails."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from .missing import missing

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium_or_skip() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        missing("needs Debian's `chromium` (apt-get install chromium)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Page:
    """One tab, attached through a flat DevTools session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session)

    async def evaluate(self, expression: str) -> Any:
        """The value of a script expression in the page (promises awaited)."""
        reply = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in reply:
            raise AssertionError(f"script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 20.0) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path, width: int = 1400) -> Path:
        """The whole page, not just the viewport."""
        height = int(await self.evaluate("document.documentElement.scrollHeight"))
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = await self.send("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        await asyncio.get_running_loop().run_in_executor(None, path.write_bytes, png)
        return path


class Browser:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="cdp-reader")

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            reply = message.json()
            future = self._waiting.pop(reply.get("id", -1), None)
            if future is None or future.done():
                continue  # an event: not needed here
            if "error" in reply:
                future.set_exception(AssertionError(f"DevTools: {reply['error']}"))
            else:
                future.set_result(reply.get("result", {}))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        message_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = future
        command: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        await self.ws.send_json(command)
        return await asyncio.wait_for(future, 30)

    async def open(self, url: str, width: int = 1400, height: int = 1000) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await page.send("Page.navigate", url=url)
        await page.wait_for("document.readyState === 'complete'")
        return page

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Browser]:
    """Start chromium on a free DevTools port, in its own profile directory; stop it after."""
    binary = chromium_or_skip()
    port = _free_port()
    log = (profile / "chromium.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={profile / 'profile'}",
        f"--remote-debugging-port={port}",
        "--remote-debugging-address=127.0.0.1",
        "about:blank",
        stdout=log,
        stderr=log,
    )
    try:
        async with aiohttp.ClientSession() as http:
            ws_url = await _devtools_url(http, port, proc)
            async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                browser = Browser(ws)
                try:
                    yield browser
                finally:
                    await browser.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def _devtools_url(
    http: aiohttp.ClientSession, port: int, proc: asyncio.subprocess.Process
) -> str:
    for _ in range(150):  # up to ~15 s for a cold start on a busy machine
        if proc.returncode is not None:
            raise AssertionError(f"chromium exited with {proc.returncode} before listening")
        try:
            async with http.get(f"http://127.0.0.1:{port}/json/version") as r:
                return str((await r.json())["webSocketDebuggerUrl"])
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise AssertionError("chromium's DevTools endpoint never answered")
