"""The stream watcher, without any I/O."""

from __future__ import annotations

from pathlib import Path

from meterproxy.endpoints import CHAT, RESPONSES
from meterproxy.sse import Event, SSEScanner
from meterproxy.watch import StreamWatch, UsageCut


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
