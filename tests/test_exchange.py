"""The exchange's outcome changes only through its named transitions."""

from __future__ import annotations

from meterproxy.errors import MalformedJSON, RateLimited, UpstreamTimeout
from meterproxy.exchange import Outcome, RequestKeys, Waste

from .factories import exchange


def test_refusals_by_the_proxy_and_by_its_upstream() -> None:
    ex = exchange()
    ex.refuse(MalformedJSON("bad"))
    assert (ex.status, ex.outcome) == ("400", Outcome.REFUSED)
    ex = exchange()
    ex.refuse(RateLimited("slow down", limit="requests_per_minute", retry_after_s=1, headers={}))
    assert (ex.status, ex.outcome) == ("429", Outcome.REFUSED)
    ex = exchange()
    ex.upstream_failed("first_byte_timeout")
    ex.refuse(UpstreamTimeout("late"))
    assert (ex.status, ex.outcome, ex.upstream_error) == (
        "504",
        Outcome.UPSTREAM_ERROR,
        "first_byte_timeout",
    )


def test_upstream_answers() -> None:
    for status, outcome in ((200, Outcome.SUCCESS), (400, Outcome.UPSTREAM_REJECTED)):
        ex = exchange()
        ex.answered(status)
        assert (ex.status, ex.outcome) == (str(status), outcome)
    ex = exchange()
    ex.answered(503)
    assert ex.outcome is Outcome.UPSTREAM_ERROR


def test_a_client_that_leaves_after_the_final_event_changes_nothing() -> None:
    ex = exchange()
    ex.answered(200)
    ex.finished()
    assert ex.client_left() is False
    assert (ex.status, ex.outcome, ex.waste) == ("200", Outcome.SUCCESS, None)


def test_a_client_that_leaves_before_the_end_is_a_499_with_waste() -> None:
    ex = exchange()
    ex.answered(200)  # headers being written
    assert ex.client_left() is True
    assert (ex.status, ex.outcome, ex.waste) == (
        "499",
        Outcome.CLIENT_DISCONNECT,
        Waste.CLIENT_DISCONNECT,
    )
    assert ex.client_left() is False  # once


def test_a_broken_stream_stays_broken_and_truncation_never_hides_it() -> None:
    ex = exchange()
    ex.answered(200)
    ex.broke("reset")
    ex.truncated()
    assert (ex.status, ex.upstream_error, ex.waste) == ("502", "reset", Waste.UPSTREAM_ERROR)
    assert ex.client_left() is False


def test_request_keys_are_unique_across_generators() -> None:
    a, b = RequestKeys(), RequestKeys()
    keys = {a.new() for _ in range(1000)} | {b.new() for _ in range(1000)}
    assert len(keys) == 2000 and all(k.startswith("mp-") for k in keys)


def test_a_repeat_is_flagged_and_is_waste_only_when_nothing_else_explains_it() -> None:
    plain = exchange()
    plain.answered(200)
    plain.repeated()
    assert (plain.duplicate, plain.waste, plain.outcome) == (True, Waste.DUPLICATE, Outcome.SUCCESS)
    for cause in ("truncated", "client_left", "broke"):
        ex = exchange()
        ex.answered(200)
        if cause == "broke":
            ex.broke("reset")
        else:
            getattr(ex, cause)()
        before = ex.waste
        ex.repeated()
        assert ex.duplicate and ex.waste is before and before is not None
