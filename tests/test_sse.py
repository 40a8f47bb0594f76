"""The SSE scanner: recorded streams split at every byte offset give the same events."""

from __future__ import annotations

import functools
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterproxy import sse
from meterproxy.sse import Event, SSEScanner

VLLM = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" caf\xc3\xa9"},"logprobs":null,'
    b'"finish_reason":"stop","stop_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[],"usage":{"prompt_tokens":5,"total_tokens":6,"completion_tokens":1}}\n\n'
    b"data: [DONE]\n\n"
)
TRTLLM_ROLE = b'data: {"choices":[{"delta":{"role":"assistant"}}]} \n\n'
RESPONSES = (
    b'event: response.created\ndata: {"type":"response.created"}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":"hi"}\n\n'
    b": keep-alive comment\n\n"
)
CRLF = b'data: {"a":1}\r\n\r\ndata: line1\r\ndata: line2\r\n\r\nevent: x\rdata: y\r\r'


def scan_whole(stream: bytes) -> list[Event]:
    scanner = SSEScanner()
    return scanner.feed(stream) + scanner.flush()


@pytest.mark.parametrize(
    "stream",
    [VLLM, TRTLLM_ROLE + VLLM, RESPONSES, CRLF],
    ids=["vllm", "trtllm", "responses", "crlf"],
)
def test_every_split_point_gives_the_same_events(stream: bytes) -> None:
    whole = scan_whole(stream)
    for cut in range(len(stream) + 1):
        scanner = SSEScanner()
        events = scanner.feed(stream[:cut]) + scanner.feed(stream[cut:]) + scanner.flush()
        assert events == whole, f"split at byte {cut}"
    # Byte by byte, too; and the raw bytes always reassemble the stream exactly.
    scanner = SSEScanner()
    events = [e for i in range(len(stream)) for e in scanner.feed(stream[i : i + 1])]
    assert events + scanner.flush() == whole
    assert b"".join(e.raw for e in whole) == stream


def test_fields_are_parsed() -> None:
    events = scan_whole(VLLM)
    assert len(events) == 4 and all(e.complete for e in events)
    assert events[1].data.startswith(b'{"id"') and " café".encode() in events[1].data
    assert events[3].data == b"[DONE]"
    crlf = scan_whole(CRLF)
    assert [e.data for e in crlf] == [b'{"a":1}', b"line1\nline2", b"y"]
    assert crlf[2].name == b"x"
    responses = scan_whole(RESPONSES)
    assert responses[0].name == b"response.created"
    assert responses[2].data == b""  # a comment carries no data


def test_trailing_space_of_trtllm_role_chunk_is_kept_in_data() -> None:
    [event] = scan_whole(TRTLLM_ROLE)
    assert event.data.endswith(b"} ")
    assert event.raw == TRTLLM_ROLE


def test_bytes_without_a_blank_line_come_back_incomplete_on_flush() -> None:
    scanner = SSEScanner()
    assert scanner.feed(b'data: {"partial": tr') == []
    assert scanner.pending == 20
    [event] = scanner.flush()
    assert not event.complete and event.raw == b'data: {"partial": tr'
    assert scanner.flush() == []


# -- properties (hypothesis): any chunking, any bytes, bounded memory ---------------------------

RECORDED = [VLLM, TRTLLM_ROLE + VLLM, RESPONSES, CRLF]
FUZZ = settings(max_examples=200, deadline=None, database=None)


def scan_chunked(stream: bytes, cuts: list[int], scanner: SSEScanner | None = None) -> list[Event]:
    scanner = scanner or SSEScanner()
    events: list[Event] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        events += scanner.feed(stream[start:cut])
        start = cut
    return events + scanner.flush()


def cuts_for(stream: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(stream)), max_size=40)


@FUZZ
@given(st.data())
def test_any_chunking_of_a_recorded_stream_gives_the_same_events(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from(RECORDED))
    cuts = data.draw(cuts_for(stream))
    assert scan_chunked(stream, cuts) == scan_whole(stream)


_LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_FIELD_LINE = st.one_of(
    _LINE.map(lambda v: b"data: " + v),
    _LINE.map(lambda v: b"data:" + v),
    st.just(b"data"),
    _LINE.map(lambda v: b"event: " + v.strip()),
    _LINE.map(lambda v: b": " + v),  # a comment
    _LINE.map(lambda v: b"id: " + v),
)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[list[bytes]]]:
    """A well-formed stream with one line ending throughout, and each event's lines."""
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    events = draw(st.lists(st.lists(_FIELD_LINE, min_size=1, max_size=4), max_size=8))
    stream = b"".join(b"".join(line + eol for line in lines) + eol for lines in events)
    return stream, events


def expected_data(lines: list[bytes]) -> bytes:
    values = []
    for line in lines:
        if line == b"data":
            values.append(b"")
        elif line.startswith(b"data:"):
            value = line[5:]
            values.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(values)


@FUZZ
@given(sse_streams(), st.data())
def test_generated_streams_parse_to_their_events_at_any_chunking(
    generated: tuple[bytes, list[list[bytes]]], data: st.DataObject
) -> None:
    stream, lines = generated
    events = scan_chunked(stream, data.draw(cuts_for(stream)))
    assert events == scan_whole(stream)
    assert [e.data for e in events] == [expected_data(e) for e in lines]
    assert all(e.complete for e in events)
    assert b"".join(e.raw for e in events) == stream


@FUZZ
@given(st.binary(max_size=2000), st.data())
def test_arbitrary_bytes_never_raise_and_nothing_is_lost(raw: bytes, data: st.DataObject) -> None:
    scanner = SSEScanner()
    events = scan_chunked(raw, data.draw(cuts_for(raw)), scanner)
    assert b"".join(e.raw for e in events) == raw
    assert all(e.complete for e in events[:-1])
    assert scanner.pending == 0


def event_limit_api() -> tuple[Any, type[Exception]]:
    """The bounded scanner of issue 10: `SSEScanner(max_event_bytes=N)` raises
    `sse.EventTooLarge` (a ValueError) once an event grows past N bytes."""
    too_large = getattr(sse, "EventTooLarge", None)
    assert isinstance(too_large, type) and issubclass(too_large, ValueError), (
        "meterproxy.sse.EventTooLarge (a ValueError) is missing: the event bound of issue 10"
    )
    return functools.partial(SSEScanner, max_event_bytes=LIMIT), too_large


LIMIT = 4096


@FUZZ
@given(st.integers(2 * LIMIT, 8 * LIMIT), st.lists(st.integers(1, 3 * LIMIT), max_size=30))
def test_an_event_past_the_limit_raises_with_memory_held_to_the_limit(
    size: int, chunk_sizes: list[int]
) -> None:
    bounded, too_large = event_limit_api()
    stream = VLLM + b"data: " + b"x" * size + b"\n\n" + VLLM
    scanner = bounded()
    events: list[Event] = []
    start = 0
    with pytest.raises(too_large):
        for n in [*chunk_sizes, len(stream)]:
            events += scanner.feed(stream[start : start + n])
            start += n
            assert scanner.pending <= LIMIT  # never more held than the limit
        scanner.flush()  # at the latest at the end of the stream
    assert events == scan_whole(VLLM)  # the events before the long one came through


@FUZZ
@given(st.data())
def test_events_within_the_limit_are_unaffected_by_it(data: st.DataObject) -> None:
    bounded, _ = event_limit_api()
    stream = data.draw(st.sampled_from(RECORDED)) * 3
    cuts = data.draw(cuts_for(stream))
    assert scan_chunked(stream, cuts, bounded()) == scan_whole(stream)


def test_a_long_line_without_a_newline_is_not_copied_over_and_over() -> None:
    bounded, too_large = event_limit_api()
    scanner = bounded()
    piece = b"x" * 1024
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(too_large):
            scanner.feed(b"data: ")
            for _ in range(64):  # 64 KiB in 1 KiB pieces, 16x the limit
                scanner.feed(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * LIMIT + 64 * 1024


# -- take_whole: the relay's way through engine streams, equal to feed ------------------------

MARKS = (b'"usage"', b'"finish_reason":"')
TOKENS = b"".join(
    b'data: {"choices":[{"index":0,"delta":{"content":"t%d"},"finish_reason":null}]}\n\n' % i
    for i in range(12)
)
ENGINE = [VLLM, TRTLLM_ROLE + VLLM, TOKENS + VLLM, VLLM + TOKENS]


def scan_taking(
    stream: bytes, cuts: list[int], unless: tuple[bytes, ...] = (), limit: int | None = None
) -> list[Event]:
    """As relay_stream drives the scanner: whole events taken where take_whole can take them
    (and what it leaves held fed by feed(b"")), anything else fed."""
    scanner = SSEScanner(max_event_bytes=limit)
    events: list[Event] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        chunk, start = stream[start:cut], cut
        taken = scanner.take_whole(chunk, unless)
        if taken is None:
            events += scanner.feed(chunk)
            continue
        done, count, stopped = taken
        whole = sse.whole_events(done) if count else []
        assert len(whole) == count and b"".join(e.raw for e in whole) == done
        assert not any(mark in done for mark in unless)
        events += whole
        if stopped:
            events += scanner.feed(b"")
    return events + scanner.flush()


@pytest.mark.parametrize("unless", [(), MARKS], ids=["all", "unless-marks"])
@pytest.mark.parametrize("stream", [*ENGINE, RESPONSES, CRLF])
def test_taking_whole_events_gives_what_feed_gives_at_every_split_point(
    stream: bytes, unless: tuple[bytes, ...]
) -> None:
    whole = scan_whole(stream)
    for cut in range(len(stream) + 1):
        assert scan_taking(stream, [cut], unless) == whole, f"split at byte {cut}"
    assert scan_taking(stream, list(range(len(stream))), unless) == whole  # byte by byte


@FUZZ
@given(st.data())
def test_taking_whole_events_at_any_chunking_gives_what_feed_gives(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from([*ENGINE, *RECORDED]))
    cuts = data.draw(cuts_for(stream))
    unless = data.draw(st.sampled_from([(), MARKS]))
    assert scan_taking(stream, cuts, unless) == scan_whole(stream)
    assert scan_taking(stream * 3, cuts, unless, LIMIT) == scan_whole(stream * 3)


@FUZZ
@given(sse_streams(), st.data())
def test_taking_whole_events_of_any_stream_gives_what_feed_gives(
    generated: tuple[bytes, list[list[bytes]]], data: st.DataObject
) -> None:
    stream, _ = generated
    assert scan_taking(stream, data.draw(cuts_for(stream)), MARKS) == scan_whole(stream)


def test_whole_data_events_are_counted_only_when_nothing_else_is_there() -> None:
    one = b'data: {"a":1}\n\n'
    assert sse.whole_data_events(one) == 1
    assert sse.whole_data_events(one * 5) == 5
    for other in (
        b"",
        b"data: \n\n",  # an event without a payload is not counted by the watch
        one + b"data: \n\n",
        b"data:" + one[6:],  # no space: not the form engines write
        one[:-1],
        one + b": comment\n\n",
        b"event: x\n" + one,
        one.replace(b"\n\n", b"\r\n\r\n"),
        one + b"\n",
        b'data: {"a":\n1}\n\n',
    ):
        assert sse.whole_data_events(other) == 0, other


def test_take_whole_leaves_a_limit_breaking_chunk_to_feed() -> None:
    scanner = SSEScanner(max_event_bytes=32)
    assert scanner.take_whole(b"data: " + b"x" * 40 + b"\n\n") is None
    assert scanner.take_whole(b"data: " + b"x" * 40) is None
    assert scanner.pending == 0
