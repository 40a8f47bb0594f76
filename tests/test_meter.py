"""The stream watcher and settlement, without any I/O."""

from __future__ import annotations

import pytest

from meterproxy.meter import Meter, Record, StreamWatch
from meterproxy.sse import Event, SSEScanner
from meterproxy.usage import Source, Usage


def events(stream: bytes) -> list[Event]:
    scanner = SSEScanner()
    return scanner.feed(stream) + scanner.flush()


ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}\n\n'
LAST = b'data: {"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"length"}]}\n\n'
USAGE = (
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def test_first_token_is_the_first_chunk_with_content_not_the_role_chunk() -> None:
    ticks = iter(range(100, 200))
    watch = StreamWatch(lambda: next(ticks), strip_usage=False)
    for event in events(ROLE + TOKEN + LAST + USAGE + DONE):
        watch.on_event(event)
    assert watch.first_token_ns == 100  # read once, at the first content chunk
    assert watch.done and watch.truncated and not watch.error
    assert watch.last_usage is not None and b'"completion_tokens":2' in watch.last_usage
    assert watch.text() == " hi!"


def test_only_the_usage_only_chunk_is_stripped() -> None:
    watch = StreamWatch(lambda: 0, strip_usage=True)
    kept = [e.raw for e in events(ROLE + TOKEN + USAGE + DONE) if not watch.is_proxy_usage_chunk(e)]
    assert kept == [ROLE, TOKEN, DONE]
    assert not StreamWatch(lambda: 0, strip_usage=False).is_proxy_usage_chunk(events(USAGE)[0])
    # A content chunk that also carries usage (continuous stats) is never dropped.
    both = (
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    )
    assert not StreamWatch(lambda: 0, strip_usage=True).is_proxy_usage_chunk(events(both)[0])


def test_usage_null_is_not_usage_and_in_band_errors_are_seen() -> None:
    watch = StreamWatch(lambda: 0, strip_usage=False)
    watch.on_event(events(b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n')[0])
    assert watch.last_usage is None
    watch.on_event(events(b'data: {"error":{"message":"boom","code":500}}\n\n')[0])
    assert watch.error


def test_long_streams_are_compacted_to_text() -> None:
    watch = StreamWatch(lambda: 0, strip_usage=False)
    for _ in range(2000):
        watch.on_event(events(TOKEN)[0])
    assert watch.text() == " hi" * 2000


def test_settle_runs_every_sink_exactly_once_and_guards_failures() -> None:
    seen: list[Record] = []
    errors: list[int] = []

    def broken(record: Record) -> None:
        raise ValueError("bug in a sink")

    meter = Meter(lambda: 50, [broken, seen.append], on_error=lambda: errors.append(1))
    record = Record(request_id="r1", endpoint="chat_completions", started_ns=10)
    meter.settle(record)
    assert seen == [record] and errors == [1] and record.duration_ns == 40
    with pytest.raises(RuntimeError, match="settled twice"):
        meter.settle(record)
    assert len(seen) == 1


def test_time_per_output_token() -> None:
    record = Record(
        request_id="r",
        endpoint="chat_completions",
        started_ns=0,
        streamed=True,
        first_token_ns=1_000,
        ended_ns=10_000,
        usage=Usage(5, 10, None, None, Source.UPSTREAM),
    )
    assert record.ttft_ns == 1_000
    assert record.tpot_ns == 1_000  # (10_000 - 1_000) / (10 - 1)
    record.usage = Usage(5, 1, None, None, Source.UPSTREAM)
    assert record.tpot_ns is None
