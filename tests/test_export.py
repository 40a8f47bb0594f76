"""CloudEvents export: the event format, the fake OpenMeter's strictness (it is what the tests
trust), and delivery at least once: failed and lost batches sent again, each request's event
stored once by its id, a refused event isolated, a full queue and a shutdown counted; then end
to end through the proxy, where the OpenMeter meters shipped in deploy/ sum to the ledger."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from meterproxy.export.cloudevents import BATCH_CONTENT_TYPE, event
from meterproxy.export.exporter import exporter as new_exporter
from meterproxy.export.settings import CloudEvents
from meterproxy.ledger import COLUMNS, Ledger, row
from meterproxy.sim.openmeter import FakeOpenMeter, validate_meter
from meterproxy.sim.upstream import Behavior, with_failure
from meterproxy.usage import Source, Usage

from .conftest import Proxy, StartProxy, StartUpstream
from .factories import settlement
from .test_e2e_cost_ledger import flushed, run_load

METERS = yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "deploy" / "openmeter.yaml").read_text()
)["meters"]


@pytest.fixture
async def start_sink() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(faults: Callable[[int], str] = lambda n: "ok") -> tuple[FakeOpenMeter, str]:
        sink = FakeOpenMeter(meters=METERS, faults=faults)
        runner = web.AppRunner(sink.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return sink, f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1/events"

    yield start
    for runner in runners:
        await runner.cleanup()


def exporter(url: str, counts: dict[str, int], spill: Path, **options: Any) -> Ledger:
    settings = CloudEvents(url=url, interval_s=0.01, retry_max_s=0.05, **options)

    def count(result: str, n: int) -> None:
        counts[result] = counts.get(result, 0) + n

    return new_exporter(settings, on_events=count, spill_path=str(spill))


def test_an_event_is_a_structured_cloudevent_whose_data_is_the_ledger_row() -> None:
    s = settlement(
        request_id="mp-7",
        tenant="research",
        ts=1_700_000_000.25,
        client_user="alice",
        priced=True,
        usage=Usage(12, None, None, None, Source.ESTIMATE),
    )
    e = event(row(s), source="meterproxy", type_="meterproxy.request")
    assert {k: e[k] for k in e if k != "data"} == {
        "specversion": "1.0",
        "id": "mp-7",
        "source": "meterproxy",
        "type": "meterproxy.request",
        "subject": "research",
        "time": "2023-11-14T22:13:20.250Z",
        "datacontenttype": "application/json",
    }
    data = e["data"]
    assert isinstance(data, dict) and tuple(data) == COLUMNS
    assert data["priced"] is True and data["completion_tokens"] is None  # unknown, not 0
    assert data["client_user"] == "alice" and data["prompt_tokens"] == 12
    datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00"))  # RFC 3339


async def test_the_fake_openmeter_is_as_strict_as_openmeter(
    start_sink: Callable[..., Any],
) -> None:
    sink, url = await start_sink()
    good = event(row(settlement(request_id="a")), source="s", type_="meterproxy.request")
    async with aiohttp.ClientSession() as http:

        async def post(body: Any, kind: str = BATCH_CONTENT_TYPE) -> int:
            async with http.post(url, data=orjson.dumps(body), headers={"Content-Type": kind}) as r:
                return r.status

        assert await post([good], BATCH_CONTENT_TYPE + "; charset=utf-8") == 400  # verbatim
        assert await post([good, {**good, "id": "b", "subject": ""}]) == 400  # whole batch
        assert await post([good, {**good, "time": "yesterday"}]) == 400
        assert sink.events == {}
        assert await post([good, good]) == 204
        assert await post(good, "application/cloudevents+json") == 204
        assert len(sink.received) == 3 and list(sink.events) == [("s", "a")]  # deduplicated
        nulls = event(
            row(settlement(request_id="c", usage=Usage(None, None, None, None, Source.NONE))),
            source="s",
            type_="meterproxy.request",
        )
        assert await post([nulls]) == 204
    assert sink.meter("meterproxy_requests") == 2
    assert sink.meter("meterproxy_input_tokens") == 10  # the null is not counted
    assert sink.invalid_for("meterproxy_input_tokens") == 1
    assert sink.meter("meterproxy_cost_usd") == pytest.approx(0.002)


def test_the_shipped_meters_are_valid_and_read_fields_every_event_has() -> None:
    data = event(row(settlement()), source="s", type_="meterproxy.request")["data"]
    assert isinstance(data, dict)
    assert {m["slug"] for m in METERS} >= {
        "meterproxy_input_tokens",
        "meterproxy_output_tokens",
        "meterproxy_energy_joules",
        "meterproxy_cost_usd",
    }
    for meter in METERS:
        assert validate_meter(meter) == [], meter
        assert meter["eventType"] == CloudEvents().type
        paths = [meter.get("valueProperty"), *(meter.get("groupBy") or {}).values()]
        for path in filter(None, paths):
            assert path.startswith("$.") and path[2:] in data, (meter["slug"], path)


async def drain(exp: Ledger, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (exp.queued or exp.spilled) and time.monotonic() < deadline:
        await exp.flush()
        await asyncio.sleep(0.01)
    assert exp.queued == exp.spilled == 0


async def test_failed_and_lost_batches_are_sent_again_and_each_request_stored_once(
    start_sink: Callable[..., Any], tmp_path: Path
) -> None:
    faults = {1: "fail", 2: "lost", 4: "fail", 5: "fail", 7: "lost"}
    sink, url = await start_sink(lambda n: faults.get(n, "ok"))
    counts: dict[str, int] = {}
    exp = exporter(url, counts, tmp_path / "spill.db", batch_events=25, api_key="om-token")
    await exp.open()
    for i in range(200):
        exp.add(settlement(request_id=f"mp-{i}", usage=Usage(10, i, None, None, Source.UPSTREAM)))
    await drain(exp)
    await exp.close()
    assert sorted(i for _, i in sink.events) == sorted(f"mp-{i}" for i in range(200))
    assert len(sink.received) == 200 + 2 * 25  # the two lost batches arrived twice
    assert sink.meter("meterproxy_output_tokens") == sum(range(200))  # counted once
    assert counts == {"sent": 200, "failed": 125}  # per event; a lost batch counts as failed
    assert set(sink.content_types) == {BATCH_CONTENT_TYPE}
    assert set(sink.authorizations) == {"Bearer om-token"}


async def test_an_event_refused_for_its_content_is_isolated_and_the_rest_delivered(
    start_sink: Callable[..., Any], tmp_path: Path
) -> None:
    sink, url = await start_sink()
    counts: dict[str, int] = {}
    exp = exporter(url, counts, tmp_path / "spill.db", batch_events=16)
    await exp.open()
    for i in range(16):
        exp.add(settlement(request_id="" if i == 9 else f"mp-{i}"))  # an id OpenMeter refuses
    assert await exp.flush() is True
    await exp.close()
    assert len(sink.events) == 15 and ("meterproxy", "") not in sink.events
    assert counts == {"sent": 15, "rejected": 1}


async def test_overflow_and_a_shutdown_with_the_receiver_down_wait_in_the_spill_file(
    start_sink: Callable[..., Any], tmp_path: Path
) -> None:
    """At least once across restarts: what the receiver did not take (the queue overflowed, the
    proxy stopped while it was down) is in the spill file, and the next start sends it."""
    sink, url = await start_sink(lambda n: "fail" if n < 3 else "ok")
    counts: dict[str, int] = {}
    first = exporter(url, counts, tmp_path / "spill.db", max_queue_events=5, batch_events=4)
    await first.open()
    for i in range(12):
        first.add(settlement(request_id=f"mp-{i}"))
    assert first.queued == 12  # 5 queued, 7 on their way to the spill file: none dropped
    assert await first.flush() is False  # request 0 fails
    assert (first.queued, first.spilled) == (5, 7)
    await first.close()  # request 1 fails: the 5 queued join the spill file
    assert first.spilled == 12 and counts == {"failed": 8}
    second = exporter(url, counts, tmp_path / "spill.db", batch_events=4)
    await second.open()
    assert second.spilled == 12
    await drain(second)  # request 2 fails too, then all are delivered
    await second.close()
    assert sorted(i for _, i in sink.events) == sorted(f"mp-{i}" for i in range(12))
    assert counts == {"failed": 12, "sent": 12}


async def test_through_the_proxy_each_request_is_one_event_and_the_meters_equal_the_ledger(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    start_sink: Callable[..., Any],
    tmp_path: Path,
) -> None:
    sink, url = await start_sink(lambda n: "fail" if n % 4 == 1 else "lost" if n % 7 == 3 else "ok")
    up = await start_upstream(
        {
            "llama": Behavior(tokens=30, pace_s=0.005),
            "broken": with_failure(Behavior(tokens=30), "reset", after=6),
        }
    )
    proxy: Proxy = await start_proxy(
        {
            "upstreams": [{"name": "gpu", "url": up.url, "kind": "vllm", "gpus": [0]}],
            "energy": {"source": "simulated"},
            "pricing": {"models": {"llama": {"input": 1.0, "output": 2.0}}},
            "export": {
                "cloudevents": {
                    "url": url,
                    "interval_s": 0.05,
                    "retry_max_s": 0.2,
                    "batch_events": 20,
                    "spill_path": str(tmp_path / "export-spill.db"),
                }
            },
        }
    )
    assert await run_load(proxy.base_url, 120, seed=3) > 10
    for _ in range(600):
        if len(sink.events) >= 120:
            break
        await asyncio.sleep(0.05)
    rows: list[sqlite3.Row] = await flushed(proxy)
    assert sorted(i for _, i in sink.events) == sorted(r["request_id"] for r in rows)
    assert len(rows) == len(proxy.settled) == 120
    assert len(sink.received) > 120  # lost batches were sent again; stored once by id

    def total(column: str) -> float:
        return sum(r[column] or 0 for r in rows)

    assert sink.meter("meterproxy_requests") == 120
    assert sink.meter("meterproxy_input_tokens") == total("prompt_tokens")
    assert sink.meter("meterproxy_output_tokens") == total("completion_tokens")
    assert sink.meter("meterproxy_cost_usd") == pytest.approx(total("cost_usd"))
    assert sink.meter("meterproxy_energy_joules") == pytest.approx(total("energy_j"))
    assert total("energy_j") > 0
    assert sink.meter("meterproxy_output_tokens", model="broken") == sum(
        r["completion_tokens"] or 0 for r in rows if r["model"] == "broken"
    )
    assert proxy.sample("meterproxy_export_events_total", result="failed") > 0
    assert proxy.sample("meterproxy_export_events_total", result="sent") >= 120
    assert proxy.sample("meterproxy_export_queued_events") == 0
