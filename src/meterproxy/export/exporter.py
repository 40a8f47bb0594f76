"""The CloudEvents exporter: a settlement sink that queues rows (bounded, never blocking) and
one task that POSTs them in batches, at least once.

A batch the receiver answers 2xx is `sent`. A refusal that may pass (no connection, a timeout,
429, 5xx, or 401/403/404 while someone fixes the token or URL) is `failed`: the batch goes back
to the head of the queue and is sent again after a backoff with jitter, up to `retry_max_s`. A
batch refused for its content (400, 413, 422) is split in halves until the event at fault is
alone; that one is `rejected` (logged with its id), the others are delivered. A full queue
drops its oldest event (`dropped`). At close, delivery continues for up to `timeout_s`; what is
left is dropped and counted. Every outcome is counted per event.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp

from ..ledger import row
from ..store.schema import Row
from .cloudevents import BATCH_CONTENT_TYPE, batch
from .settings import CloudEvents

if TYPE_CHECKING:
    from ..settlement import Settlement

log = logging.getLogger(__name__)
CONTENT_REFUSED = frozenset({400, 413, 422})


class Sent(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    REFUSED = "refused"  # the receiver refused the content: sending it again cannot help


class CloudEventsExporter:
    def __init__(
        self,
        settings: CloudEvents,
        *,
        on_events: Callable[[str, int], None],
        rng: random.Random | None = None,
    ) -> None:
        assert settings.url is not None
        self.url = settings.url
        self._settings = settings
        self._on_events = on_events  # (result, events): sent, failed, rejected, dropped
        self._queue: collections.deque[Row] = collections.deque()
        self._rng = rng or random.Random()
        self._failures = 0
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": BATCH_CONTENT_TYPE}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"

    @property
    def queued(self) -> int:
        return len(self._queue)

    def add(self, settlement: Settlement) -> None:
        """Settlement sink: queue the event's row; never blocks, never does I/O."""
        self._queue.append(row(settlement))
        self._bound()

    def _bound(self) -> None:
        over = len(self._queue) - self._settings.max_queue_events
        if over > 0:
            for _ in range(over):
                self._queue.popleft()
            self._on_events("dropped", over)

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._delay_s())
            await self.flush()

    def _delay_s(self) -> float:
        s = self._settings
        if not self._failures:
            return s.interval_s
        backoff = min(s.retry_max_s, s.interval_s * 2.0 ** min(self._failures, 30))
        return backoff * self._rng.uniform(0.5, 1.0)

    async def flush(self) -> bool:
        """Send everything queued; False (events kept) when the receiver is failing."""
        while self._queue:
            n = min(len(self._queue), self._settings.batch_events)
            rows = [self._queue.popleft() for _ in range(n)]
            try:
                left = await self._deliver(rows)
            except asyncio.CancelledError:  # stopped mid-batch: keep it (sent again: at least once)
                self._queue.extendleft(reversed(rows))
                raise
            if left:
                self._queue.extendleft(reversed(left))
                self._bound()
                if not self._failures:
                    log.error(
                        "CloudEvents export to %s is failing; %d events wait and are retried",
                        self.url,
                        len(self._queue),
                    )
                self._failures += 1
                return False
        if self._failures:
            log.info("CloudEvents export to %s delivers again", self.url)
        self._failures = 0
        return True

    async def _deliver(self, rows: list[Row]) -> list[Row]:
        """Send rows; the ones still to send later (a retryable failure) are returned."""
        result = await self._post(rows)
        if result is Sent.OK:
            self._on_events("sent", len(rows))
            return []
        if result is Sent.RETRY:
            self._on_events("failed", len(rows))
            return rows
        if len(rows) == 1:
            self._on_events("rejected", 1)
            log.error("CloudEvents receiver %s rejected the event for %r", self.url, rows[0][0])
            return []
        half = len(rows) // 2
        left = await self._deliver(rows[:half])
        if left:
            return left + rows[half:]
        return await self._deliver(rows[half:])

    async def _post(self, rows: list[Row]) -> Sent:
        assert self._session is not None, "open() first"
        s = self._settings
        body = batch(rows, source=s.source, type_=s.type)
        try:
            async with self._session.post(self.url, data=body, headers=self._headers) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.debug("CloudEvents POST to %s failed: %r", self.url, exc)
            return Sent.RETRY
        if 200 <= status < 300:
            return Sent.OK
        if status in CONTENT_REFUSED:
            return Sent.REFUSED
        log.debug("CloudEvents POST to %s: HTTP %d", self.url, status)
        return Sent.RETRY

    async def close(self) -> None:
        async def drain() -> None:
            for _ in range(1_000):  # bounded by the timeout below
                if await self.flush():
                    return
                await asyncio.sleep(min(0.5, self._delay_s()))

        try:
            await asyncio.wait_for(drain(), self._settings.timeout_s)
        except asyncio.TimeoutError:
            pass
        if self._queue:
            log.error("CloudEvents export: %d events not delivered at shutdown", len(self._queue))
            self._on_events("dropped", len(self._queue))
            self._queue.clear()
        if self._session is not None:
            await self._session.close()
