"""The stream watcher, without any I/O."""

from __future__ import annotations

from meterproxy.endpoints import CHAT, RESPONSES
from meterproxy.sse import Event, SSEScanner
from meterproxy.watch import StreamWatch


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


def test_only_the_usage_only_chunk_is_stripped() -> None:
    watch = StreamWatch(lambda: 0, CHAT, strip_usage=True)
    kept = [e.raw for e in events(ROLE + TOKEN + USAGE + DONE) if not watch.is_proxy_usage_chunk(e)]
    assert kept == [ROLE, TOKEN, DONE]
    assert not StreamWatch(lambda: 0, CHAT, strip_usage=False).is_proxy_usage_chunk(
        events(USAGE)[0]
    )
    # A content chunk that also carries usage (continuous stats) is never dropped.
    both = (
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    )
    assert not StreamWatch(lambda: 0, CHAT, strip_usage=True).is_proxy_usage_chunk(events(both)[0])


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
