"""CloudEvents from settlements (beyond tests/test_export.py's shape check): RFC 3339 times in
UTC with milliseconds, the batch format OpenMeter accepts verbatim, and the events of requests
that failed, were refused or were not priced."""

from __future__ import annotations

import orjson
import pytest

from meterproxy.exchange import Outcome
from meterproxy.export.cloudevents import BATCH_CONTENT_TYPE, batch, event, rfc3339
from meterproxy.ledger import COLUMNS, row
from meterproxy.usage import NO_USAGE

from .factories import settlement


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000.0, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.9996, "2023-11-14T22:13:20.999Z"),  # cut to the millisecond, not rounded up
        (1_774_999_800.5, "2026-03-31T23:30:00.500Z"),
    ],
)
def test_times_are_rfc3339_in_utc_with_milliseconds(ts: float, text: str) -> None:
    assert rfc3339(ts) == text


def test_a_batch_is_a_json_array_of_events_in_order() -> None:
    rows = [row(settlement(request_id=f"mp-{i}", tenant=f"t{i}")) for i in range(3)]
    body = batch(rows, source="proxy-eu-1", type_="meterproxy.request")
    parsed = orjson.loads(body)
    assert [e["id"] for e in parsed] == ["mp-0", "mp-1", "mp-2"]
    assert [e["subject"] for e in parsed] == ["t0", "t1", "t2"]
    assert all(e["source"] == "proxy-eu-1" and e["type"] == "meterproxy.request" for e in parsed)
    assert parsed[0] == orjson.loads(
        orjson.dumps(event(rows[0], source="proxy-eu-1", type_="meterproxy.request"))
    )
    assert BATCH_CONTENT_TYPE == "application/cloudevents-batch+json"  # no charset: verbatim
    assert batch([], source="s", type_="t") == b"[]"


def test_a_request_that_failed_is_an_event_that_says_so() -> None:
    s = settlement(
        request_id="mp-9",
        tenant="research",
        status="502",
        outcome=Outcome.UPSTREAM_ERROR,
        usage=NO_USAGE,
        upstream_error="reset",
        waste_reason="upstream_error",
        reached_upstream=True,
        priced=False,
        cost_usd=0.0,
        energy_j=None,
    )
    data = event(row(s), source="s", type_="t")["data"]
    assert isinstance(data, dict) and tuple(data) == COLUMNS
    assert data["outcome"] == "upstream_error" and data["status"] == "502"
    assert data["waste_reason"] == "upstream_error" and data["token_source"] == "none"
    assert data["priced"] is False and data["energy_j"] is None
    assert data["prompt_tokens"] is None and data["completion_tokens"] is None


def test_an_event_carries_no_secret_and_no_text_of_the_request() -> None:
    s = settlement(client_user="alice@example.com", client_request_id="abc")
    data = event(row(s), source="s", type_="t")["data"]
    assert isinstance(data, dict)
    assert not {"key", "api_key", "authorization", "prompt", "messages", "completion"} & set(data)
