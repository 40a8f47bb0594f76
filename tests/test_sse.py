"""The SSE scanner: recorded streams split at every byte offset give the same events."""

from __future__ import annotations

import pytest

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
