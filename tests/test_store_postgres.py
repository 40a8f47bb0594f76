"""The PostgreSQL store against a real server: typed columns, a retried batch never doubles
(even one whose reply was lost after the server committed), a bad row alone is rejected, the
schema is created and migrated (once, by replicas starting together), a newer schema is refused,
and a server that goes away and comes back is reconnected to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from meterproxy.ledger import COLUMNS, LEDGER_SCHEMA, REQUESTS, Ledger, row
from meterproxy.store.base import StoreUnavailable
from meterproxy.store.postgres import PostgresStore
from meterproxy.store.sqlite import SqliteStore
from meterproxy.usage import Source, Usage

from .factories import settlement
from .postgres import PostgresServer, postgres_server, query


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    return pg_server.create_database()


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(pg_url, LEDGER_SCHEMA, timeout_s=5)
    await s.open()
    yield s
    await s.close()


def rows(n: int, start: int = 0) -> list[tuple[object, ...]]:
    return [
        row(settlement(request_id=f"r{i}", usage=Usage(10, i, 2, None, Source.UPSTREAM)))
        for i in range(start, start + n)
    ]


async def test_columns_are_typed_and_values_round_trip(store: PostgresStore, pg_url: str) -> None:
    one = row(
        settlement(
            request_id="mp-1",
            ts=1_700_000_000.123456,
            usage=Usage(2**40, 7, 3, 1, Source.UPSTREAM),
            energy_j=12.5,
            cost_usd=0.25,
            priced=False,
            first_token_ns=5 * 10**8,
            client_user="alice",
        )
    )
    assert await store.insert(REQUESTS, [one]) == []
    types = dict(
        query(
            pg_url,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'requests'",
        )
    )
    assert types["prompt_tokens"] == types["completion_tokens"] == "bigint"
    assert types["energy_j"] == types["cost_usd"] == types["duration_s"] == "double precision"
    assert types["ts"] == "timestamp with time zone" and types["priced"] == "boolean"
    assert set(types) == {"id", *COLUMNS}
    (got,) = query(
        pg_url,
        "SELECT request_id, extract(epoch FROM ts)::float8, prompt_tokens, cached_tokens, "
        "completion_tokens, reasoning_tokens, ttft_s, energy_j, cost_usd, priced, client_user "
        "FROM requests",
    )
    assert got == (
        "mp-1",
        pytest.approx(1_700_000_000.123456, abs=1e-6),  # TIMESTAMPTZ keeps microseconds
        2**40,
        3,
        7,
        1,
        0.5,
        12.5,
        0.25,
        False,
        "alice",
    )


async def test_a_retried_batch_never_doubles_a_row(store: PostgresStore, pg_url: str) -> None:
    batch = rows(50)
    assert await store.insert(REQUESTS, batch) == []
    assert await store.insert(REQUESTS, batch) == []  # the same batch again
    assert await store.insert(REQUESTS, rows(30, start=40)) == []  # overlapping
    assert query(pg_url, "SELECT count(*), count(DISTINCT request_id) FROM requests") == [(70, 70)]


async def test_a_bad_row_is_rejected_alone(store: PostgresStore, pg_url: str) -> None:
    batch = rows(3)
    bad = row(settlement(request_id="bad", tenant=None))  # type: ignore[arg-type]  # NOT NULL
    rejected = await store.insert(REQUESTS, [batch[0], bad, *batch[1:]])
    assert rejected == [(bad, "NotNullViolation")]
    assert query(pg_url, "SELECT request_id FROM requests ORDER BY id") == [
        ("r0",),
        ("r1",),
        ("r2",),
    ]


async def test_the_schema_is_created_in_an_empty_database_and_kept(pg_url: str) -> None:
    first = PostgresStore(pg_url, LEDGER_SCHEMA)
    await first.open()
    await first.insert(REQUESTS, rows(2))
    await first.close()
    assert query(pg_url, "SELECT component, version FROM schema_version") == [("ledger", 2)]
    again = PostgresStore(pg_url, LEDGER_SCHEMA)
    await again.open()  # the current version: nothing to do, rows kept
    await again.close()
    assert query(pg_url, "SELECT count(*) FROM requests") == [(2,)]
    indexes = {name for (name,) in query(pg_url, "SELECT indexname FROM pg_indexes")}
    assert {"requests_ts", "requests_request_id_key"} <= indexes


async def test_the_next_version_migrates_in_place_once_while_replicas_start(
    pg_url: str,
) -> None:
    """How a later issue adds a column: one more step per dialect. Four replicas start at once
    on a version-2 database with rows: the step runs once (under the advisory lock), rows stay."""
    old = PostgresStore(pg_url, LEDGER_SCHEMA)
    await old.open()
    await old.insert(REQUESTS, rows(5))
    await old.close()
    step = (3, ("ALTER TABLE requests ADD COLUMN task TEXT",))
    newer = replace(LEDGER_SCHEMA, postgres=(*LEDGER_SCHEMA.postgres, step))
    replicas = [PostgresStore(pg_url, newer) for _ in range(4)]
    await asyncio.gather(*(r.open() for r in replicas))  # an ALTER run twice would fail
    for r in replicas:
        await r.close()
    assert query(pg_url, "SELECT version FROM schema_version WHERE component = 'ledger'") == [(3,)]
    assert query(pg_url, "SELECT count(*), count(task) FROM requests") == [(5, 0)]
    # A replica not yet upgraded refuses to write to the newer schema, and says what to do.
    behind = PostgresStore(pg_url, LEDGER_SCHEMA)
    with pytest.raises(StoreUnavailable, match=r"version 3.*up to 2; upgrade meterproxy"):
        await behind.insert(REQUESTS, rows(1, start=100))
    assert query(pg_url, "SELECT count(*) FROM requests") == [(5,)]


async def test_a_server_that_goes_away_is_reconnected_to() -> None:
    with postgres_server() as server:
        url = server.create_database()
        store = PostgresStore(url, LEDGER_SCHEMA, timeout_s=5)
        await store.insert(REQUESTS, rows(3))
        await asyncio.to_thread(server.stop, "immediate")
        with pytest.raises(StoreUnavailable):
            await store.insert(REQUESTS, rows(3, start=3))
        with pytest.raises(StoreUnavailable, match=r"connect|refused|Connection"):
            await store.insert(REQUESTS, rows(3, start=3))  # down: no connection at all
        await asyncio.to_thread(server.start)
        assert await store.insert(REQUESTS, rows(6)) == []  # the first 3 again: skipped
        await store.close()
        assert query(url, "SELECT count(*) FROM requests") == [(6,)]


class Relay:
    """A TCP relay between the store and the server that can swallow the server's replies:
    the server commits, the client never hears of it and times out."""

    def __init__(self, port: int) -> None:
        self.port, self.swallow = port, False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if not (down and self.swallow):
                        dst.write(data)
                        await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_batch_whose_reply_was_lost_after_commit_is_sent_again_without_doubling(
    pg_server: PostgresServer, pg_url: str
) -> None:
    relay = Relay(pg_server.port)
    port = await relay.start()
    store = PostgresStore(
        pg_url.replace(f":{pg_server.port}/", f":{port}/"), LEDGER_SCHEMA, timeout_s=1
    )
    await store.open()
    batch = rows(40)
    relay.swallow = True
    with pytest.raises(StoreUnavailable, match="timed out"):
        await store.insert(REQUESTS, batch)
    # The server did commit the statement; only its reply was lost.
    assert query(pg_url, "SELECT count(*) FROM requests") == [(40,)]
    relay.swallow = False
    assert await store.insert(REQUESTS, batch) == []  # the writer sends the batch again
    assert query(pg_url, "SELECT count(*), count(DISTINCT request_id) FROM requests") == [(40, 40)]
    await store.close()
    await relay.close()


async def test_a_batch_with_a_key_twice_stores_it_once(store: PostgresStore, pg_url: str) -> None:
    batch = rows(3)
    assert await store.insert(REQUESTS, [*batch, batch[1]]) == []
    assert query(pg_url, "SELECT count(*) FROM requests") == [(3,)]


async def test_a_writer_stopped_mid_batch_keeps_the_batch(
    pg_server: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    """Shutdown cancels the writer while PostgreSQL is not answering: the batch in flight is
    kept, and close() puts it in the spill file rather than losing it."""
    relay = Relay(pg_server.port)
    port = await relay.start()
    store = PostgresStore(
        pg_url.replace(f":{pg_server.port}/", f":{port}/"), LEDGER_SCHEMA, timeout_s=30
    )
    spill = SqliteStore(str(tmp_path / "spill.db"), LEDGER_SCHEMA)
    ledger = Ledger(store, spill=spill, on_error=lambda kind: None)
    await ledger.open()
    for i in range(5):
        ledger.add(settlement(request_id=f"r{i}"))
    relay.swallow = True
    flushing = asyncio.create_task(ledger.flush())
    await asyncio.sleep(0.3)  # the batch is in flight, its reply swallowed
    assert ledger.queued == 0
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert ledger.queued == 5
    await relay.close()  # PostgreSQL is unreachable now: close spills the batch
    await ledger.close()
    check = SqliteStore(str(tmp_path / "spill.db"), LEDGER_SCHEMA)
    assert len(await check.take(REQUESTS, 100)) == 5
    await check.close()
