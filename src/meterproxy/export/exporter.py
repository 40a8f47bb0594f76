"""CloudEvents export as one more store behind the shared writer: `CloudEventsReceiver` is a
`Store` whose insert POSTs a batch, so the export gets the ledger's machinery unchanged: its own
bounded queue fed by a settlement sink that never blocks, batches every interval, a backoff,
overflow spilled to a local SQLite file and drained later, and at shutdown what was not
delivered kept in that file for the next start. Delivery is at least once; the receiver
deduplicates by (source, id), as OpenMeter does.

A batch the receiver answers 2xx is `sent`. A refusal that may pass (no connection, a timeout,
429, 5xx, or 401/403/404 while someone fixes the token or URL) is `failed`: the batch is sent
again after the writer's backoff. A batch refused for its content (400, 413, 422) is split in
halves until the event at fault is alone; that one is `rejected` (logged with its id), the
others are delivered. Events are lost (`dropped`) only if the spill file fails too.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence

import aiohttp

from ..ledger import LEDGER_SCHEMA, Ledger
from ..store.base import Rejected, StoreUnavailable
from ..store.schema import Row, Table
from ..store.sqlite import SqliteStore
from .cloudevents import BATCH_CONTENT_TYPE, batch
from .settings import CloudEvents

log = logging.getLogger(__name__)
CONTENT_REFUSED = frozenset({400, 413, 422})
OnEvents = Callable[[str, int], None]  # (result, events): sent, failed, rejected, dropped


class Sent(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    REFUSED = "refused"  # the receiver refused the content: sending it again cannot help


class CloudEventsReceiver:
    def __init__(self, settings: CloudEvents, *, on_events: OnEvents) -> None:
        assert settings.url is not None
        self.where = settings.url
        self._settings = settings
        self._on_events = on_events
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": BATCH_CONTENT_TYPE}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def insert(self, table: Table, rows: Sequence[Row]) -> list[Rejected]:
        await self.open()
        result, why = await self._post(rows)
        if result is Sent.OK:
            self._on_events("sent", len(rows))
            return []
        if result is Sent.RETRY:
            self._on_events("failed", len(rows))
            raise StoreUnavailable(f"{self.where}: {why}")
        if len(rows) == 1:
            self._on_events("rejected", 1)
            return [(rows[0], why)]
        half = len(rows) // 2
        return [*await self.insert(table, rows[:half]), *await self.insert(table, rows[half:])]

    async def _post(self, rows: Sequence[Row]) -> tuple[Sent, str]:
        assert self._session is not None
        s = self._settings
        body = batch(rows, source=s.source, type_=s.type)
        try:
            async with self._session.post(self.where, data=body, headers=self._headers) as resp:
                await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            return Sent.RETRY, "timed out"
        except (aiohttp.ClientError, OSError) as exc:
            return Sent.RETRY, type(exc).__name__
        if 200 <= status < 300:
            return Sent.OK, ""
        return (Sent.REFUSED if status in CONTENT_REFUSED else Sent.RETRY), f"HTTP {status}"

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def exporter(settings: CloudEvents, *, on_events: OnEvents, spill_path: str) -> Ledger:
    """The export's writer: request rows, from settlements, to the receiver."""

    def on_error(kind: str) -> None:
        # `write` and `invalid_row` are counted by the receiver (failed, rejected), per event.
        if kind == "dropped":
            on_events("dropped", 1)
        elif kind == "spill":
            log.error("CloudEvents export: the spill file %s failed", spill_path)

    return Ledger(
        CloudEventsReceiver(settings, on_events=on_events),
        name="CloudEvents export",
        spill=SqliteStore(spill_path, LEDGER_SCHEMA),
        on_error=on_error,
        max_queue=settings.max_queue_events,
        interval_s=settings.interval_s,
        batch_rows=settings.batch_events,
        retry_max_s=settings.retry_max_s,
    )
