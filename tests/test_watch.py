"""The stream watcher, without any I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterproxy.endpoints import CHAT, RESPONSES, Endpoint
from meterproxy.sse import Event, SSEScanner, whole_data_events
from meterproxy.watch import StreamWatch, UsageCut, _cut_checked, _without_null_usage


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
    watch = StreamWatch(lambda: next(ticks), CHAT, strip_usage=False)
    for event in events(ROLE + TOKEN + LAST + USAGE + DONE):
        watch.on_event(event)
    assert watch.first_token_ns == 100  # read once, at the first content chunk
    assert watch.ended and watch.truncated and not watch.error
    assert watch.last_usage is not None and b'"completion_tokens":2' in watch.last_usage
    assert watch.text() == " hi!"


def client_view(stream: bytes) -> bytes:
    cut = UsageCut()
    return b"".join([b for e in events(stream) for b in cut.feed(e)] + cut.flush())


def test_only_the_usage_only_chunk_is_stripped() -> None:
    assert client_view(ROLE + TOKEN + LAST + USAGE + DONE) == ROLE + TOKEN + LAST + DONE


def test_usage_the_proxy_asked_for_is_cut_from_any_chunk_byte_for_byte() -> None:
    # vLLM's continuous usage on a content chunk: the chunk stays, its usage goes.
    both = (
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"prompt_tokens_details":{"a":1}}}\n\n'
    )
    assert client_view(both) == b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    # OpenAI adds "usage":null to every chunk once usage is asked for.
    hosted = (
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"usage"}}],"usage":null}\n\n'
    )
    assert client_view(hosted) == (
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"usage"}}]}\n\n'
    )
    # LiteLLM sends the usage on a chunk of its own with an empty delta: it goes whole.
    carrier = b'data: {"id":"c","choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":9}}\n\n'
    assert client_view(carrier) == b""
    # A first member, and text that merely mentions "usage", are handled too.
    first = b'data: {"usage":null,"choices":[{"delta":{"content":"\\"usage\\": 1"}}]}\n\n'
    assert client_view(first) == b'data: {"choices":[{"delta":{"content":"\\"usage\\": 1"}}]}\n\n'


def test_members_an_engine_moves_onto_the_usage_chunk_go_back_to_the_finishing_chunk() -> None:
    data = Path(__file__).parent / "data" / "llama_cpp"
    for asked, plain in (
        ("chat_stream_usage.sse", "chat_stream.sse"),
        ("chat_stream_n2_usage.sse", "chat_stream_n2.sse"),
    ):
        # llama.cpp writes `timings` on the finishing chunk, or on the usage chunk when asked
        # for usage; per-request values (ids, clocks) differ between the two recordings.
        got, want = client_view((data / asked).read_bytes()), (data / plain).read_bytes()
        assert b'"usage"' not in got
        assert [shape(line) for line in got.split(b"\n\n")] == [
            shape(line) for line in want.split(b"\n\n")
        ]


def shape(line: bytes) -> object:
    """A chunk's structure: member names in order, recursively; values other than objects and
    lists dropped."""
    if not line.startswith(b"data: {"):
        return line
    import orjson

    def walk(value: object) -> object:
        if isinstance(value, dict):
            return [(k, walk(v)) for k, v in value.items()]
        if isinstance(value, list):
            return [walk(v) for v in value]
        return None

    return walk(orjson.loads(line[6:]))


def test_one_usage_chunk_per_choice_counts_the_prompt_once_and_sums_the_choices() -> None:
    from meterproxy.usage import Source, Usage

    recorded = Path(__file__).parent / "data" / "llama_cpp" / "chat_stream_n2_usage.sse"
    watch = StreamWatch(lambda: 0, CHAT, strip_usage=True)
    for event in events(recorded.read_bytes()):
        watch.on_event(event)
    assert len(watch.usage_only) == 2  # llama.cpp: one per choice, each 27 prompt + 8
    assert watch.usage(Source.UPSTREAM) == Usage(27, 16, 22, None, Source.UPSTREAM)
    single = StreamWatch(lambda: 0, CHAT, strip_usage=True)
    for event in events(ROLE + TOKEN + USAGE + DONE):
        single.on_event(event)
    assert single.usage(Source.UPSTREAM) == Usage(3, 2, None, None, Source.UPSTREAM)


def test_usage_null_is_not_usage_and_in_band_errors_are_seen() -> None:
    watch = StreamWatch(lambda: 0, CHAT, strip_usage=False)
    watch.on_event(events(b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n')[0])
    assert watch.last_usage is None
    watch.on_event(events(b'data: {"error":{"message":"boom","code":500}}\n\n')[0])
    assert watch.error


def test_long_streams_are_compacted_to_text() -> None:
    watch = StreamWatch(lambda: 0, CHAT, strip_usage=False)
    for _ in range(2000):
        watch.on_event(events(TOKEN)[0])
    assert watch.text() == " hi" * 2000


def _responses_stream(final: str, named: bool) -> bytes:
    def event(kind: str, payload: str) -> bytes:
        head = f"event: {kind}\n" if named else ""
        return f'{head}data: {{"type":"{kind}",{payload}}}\n\n'.encode()

    return (
        event("response.created", '"response":{"status":"in_progress"}')
        + event("response.output_text.delta", '"delta":"Hi"')
        + event(final, '"response":{"status":"x","usage":{"input_tokens":3,"output_tokens":1}}')
    )


def test_responses_streams_are_judged_by_event_type_with_or_without_event_lines() -> None:
    for named in (True, False):
        done = StreamWatch(lambda: 7, RESPONSES, strip_usage=False)
        for e in events(_responses_stream("response.completed", named)):
            done.on_event(e)
        assert done.ended and not done.truncated and not done.error
        assert done.first_token_ns == 7 and done.text() == "Hi"
        cut = StreamWatch(lambda: 0, RESPONSES, strip_usage=False)
        for e in events(_responses_stream("response.incomplete", named)):
            cut.on_event(e)
        assert cut.ended and cut.truncated  # streamed truncation, as the whole body counts it
        failed = StreamWatch(lambda: 0, RESPONSES, strip_usage=False)
        for e in events(_responses_stream("response.failed", named)):
            failed.on_event(e)
        assert failed.error


def test_done_ends_only_streams_that_end_with_done() -> None:
    responses = StreamWatch(lambda: 0, RESPONSES, strip_usage=False)
    responses.on_event(events(DONE)[0])
    assert not responses.ended


# -- the relay's fast ways give what the event-by-event ways give -----------------------------


def watch_state(watch: StreamWatch) -> tuple[object, ...]:
    return (
        watch.first_token_ns,
        watch.content_events,
        watch.ended,
        watch.error,
        watch.truncated,
        watch.last_usage,
        watch.usage_only,
        watch.text(),
    )


def watched(stream: bytes, group: int, endpoint: Endpoint = CHAT) -> StreamWatch:
    """Events `group` at a time, as the relay hands whole ones over: at once where the watch
    takes them so, else one by one."""
    watch = StreamWatch(lambda: 5, endpoint, strip_usage=False)
    every = events(stream)
    for i in range(0, len(every), group):
        batch = every[i : i + group]
        chunk = b"".join(e.raw for e in batch)
        count = whole_data_events(chunk)
        if count and watch.on_whole_events(chunk, count):
            assert count == len(batch)
            continue
        for event in batch:
            watch.on_event(event)
    return watch


@pytest.mark.parametrize("group", [1, 2, 3, 7, 100])
@pytest.mark.parametrize(
    "stream",
    [
        ROLE + TOKEN * 5 + LAST + USAGE + DONE,
        TOKEN * 9 + DONE,
        ROLE + ROLE + TOKEN * 3 + b'data: {"error":{"message":"x"}}\n\n',
        ROLE + TOKEN + b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n' + DONE,
        b'data: {"choices":[{"delta":{"content":""}}]}\n\n' * 4 + TOKEN,
    ],
)
def test_whole_events_at_once_leave_the_watch_as_one_by_one_does(stream: bytes, group: int) -> None:
    assert watch_state(watched(stream, group)) == watch_state(watched(stream, 1))
    responses = _responses_stream("response.completed", named=False)
    assert watch_state(watched(responses, group, RESPONSES)) == watch_state(
        watched(responses, 1, RESPONSES)
    )


def test_a_long_lived_stream_holds_its_text_not_its_chunks() -> None:
    now = [0]
    young = StreamWatch(lambda: now[0], CHAT, strip_usage=False)
    for _ in range(1000):  # a fast stream, under a second old: kept raw, decoded only if needed
        young.on_event(events(TOKEN)[0])
    assert young.pending_bytes > 50_000 and young.text() == " hi" * 1000
    old = StreamWatch(lambda: now[0], CHAT, strip_usage=False)
    old.on_event(events(TOKEN)[0])
    now[0] = 2_000_000_000  # two seconds past its first token: a stream many clients hold
    for _ in range(999):
        old.on_event(events(TOKEN)[0])
        assert old.pending_bytes <= 8 * 1024 + len(TOKEN)
    chunk = TOKEN * 400
    assert old.on_whole_events(chunk, 400) and old.pending_bytes <= 8 * 1024 + len(chunk)
    assert old.text() == " hi" * 1400


# -- the usage cut: the fast way for `"usage":null` cuts what the checked way cuts -------------

NULL_USAGE_CASES = [
    b'{"id":"c","choices":[{"delta":{"content":"x"}}],"usage":null}',
    b'{"usage":null,"id":"c","choices":[]}',
    b'{"id":"c","usage" : null ,"obfuscation":"ab"}',
    b'{"usage":null}',
    b'{ "usage":null , "x":1 }',
    b'{"choices":[{"delta":{"content":"usage"}}],"usage":null}',  # the word in a value
    b'{"a":{"usage":null},"usage":null}',  # nested too: the checked way decides
    b'{"usag\\u0065":null,"x":"usage"}',  # an escaped key: the checked way decides
    b'{"x":"\\"usage\\":null","usage":null}',
]


@pytest.mark.parametrize("data", NULL_USAGE_CASES)
def test_the_fast_cut_of_a_null_usage_is_the_checked_cut(data: bytes) -> None:
    parsed = orjson.loads(data)
    del parsed["usage"]
    checked = _cut_checked(data, parsed)
    fast = _without_null_usage(data)
    assert fast is None or fast == checked
    raw = b"data: " + data + b"\n\n"
    kept = UsageCut().feed(Event(raw, data))
    assert kept == [b"data: " + checked + b"\n\n"] if checked is not None else [raw]


# Integers orjson parses (64-bit): the fast cut is only ever used on data that parsed.
_PARSED_INTEGERS = st.integers(-(2**63), 2**64 - 1)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "choices", "model", "x", "obfuscation", "usag"]),
        st.recursive(
            st.none() | _PARSED_INTEGERS | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.sampled_from(["usage", "a", "b"]), inner, max_size=3)
            ),
            max_leaves=6,
        ),
        max_size=4,
    ),
    st.integers(0, 4),
    st.booleans(),
)
def test_any_object_with_a_null_usage_is_cut_as_the_checked_way_cuts(
    members: dict[str, Any], position: int, ascii_only: bool
) -> None:
    items = list(members.items())
    items.insert(min(position, len(items)), ("usage", None))
    data = json.dumps(dict(items), ensure_ascii=ascii_only).encode()
    parsed = dict(items)
    del parsed["usage"]
    fast = _without_null_usage(data)
    assert fast is None or fast == _cut_checked(data, parsed)
    if fast is not None:
        assert orjson.loads(fast) == parsed
