"""Usage at the end of a request, from recorded upstream bytes: the upstream's numbers when it
sent them (exact on a whole answer, partial on a broken one), else the relayed text left to be
counted; truncation of whole bodies; what a client leaving changes, and what it does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from meterproxy import accounting
from meterproxy.config import Upstream
from meterproxy.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, OTHER, RESPONSES, Endpoint
from meterproxy.exchange import Exchange, Outcome, Waste
from meterproxy.routing import Route
from meterproxy.sse import SSEScanner
from meterproxy.usage import NO_USAGE, Source, Usage
from meterproxy.watch import StreamWatch

from .factories import exchange

DATA = Path(__file__).parent / "data" / "llama_cpp"
FIRST_TOKEN_NS = 7_000
ROUTE = Route(Upstream("u", "http://127.0.0.1:9/v1"), "gemma-3-270m")
# What llama.cpp generated for every recorded request: the same 8 tokens.
TEXT = "Name three colours.<|im_end"


def routed(endpoint: Endpoint = CHAT, **fields: Any) -> Exchange:
    """An exchange that reached its upstream and was answered 200."""
    ex = exchange(
        endpoint=endpoint,
        route=ROUTE,
        body={"model": ROUTE.model},
        reached_upstream=True,
        **fields,
    )
    ex.answered(200)
    return ex


def watched(name: str, endpoint: Endpoint = CHAT, *, cut_at: bytes | None = None) -> StreamWatch:
    """A recorded stream (up to the first `cut_at`, if given) gone by a watch."""
    stream = (DATA / f"{name}.sse").read_bytes()
    if cut_at is not None:
        stream = stream[: stream.index(cut_at)]
    watch = StreamWatch(lambda: FIRST_TOKEN_NS, endpoint, strip_usage=False)
    scanner = SSEScanner()
    for event in scanner.feed(stream) + scanner.flush():
        watch.on_event(event)
    return watch


# -- streams ----------------------------------------------------------------------------


def test_a_whole_stream_with_usage_is_accounted_exactly() -> None:
    ex, watch = routed(), watched("chat_stream_usage")
    assert watch.ended
    accounting.stream_end(ex, watch)
    assert ex.usage == Usage(27, 8, 22, None, Source.UPSTREAM) and not ex.estimated
    assert ex.pending_text is None and ex.first_token_ns == FIRST_TOKEN_NS


def test_one_usage_chunk_per_choice_counts_the_prompt_once() -> None:
    ex = routed()
    accounting.stream_end(ex, watched("chat_stream_n2_usage"))
    assert ex.usage == Usage(27, 16, 22, None, Source.UPSTREAM)


def test_a_responses_stream_reports_usage_in_its_final_event() -> None:
    ex = routed(RESPONSES)
    accounting.stream_end(ex, watched("responses_stream", RESPONSES))
    assert ex.usage == Usage(27, 8, 22, None, Source.UPSTREAM)


def test_a_stream_without_usage_leaves_its_text_to_be_counted() -> None:
    ex = routed()
    accounting.stream_end(ex, watched("chat_stream"))
    assert ex.usage is NO_USAGE and ex.pending_text == TEXT


def test_usage_sent_unasked_on_the_finishing_chunk_is_used() -> None:
    # llama.cpp's completions stream carries usage on its last chunk without being asked.
    ex = routed(COMPLETIONS)
    accounting.stream_end(ex, watched("completions_stream", COMPLETIONS))
    assert ex.usage == Usage(5, 8, 1, None, Source.UPSTREAM) and ex.pending_text is None


def test_a_broken_stream_keeps_the_usage_it_carried_as_partial() -> None:
    ex, watch = routed(), watched("chat_stream_usage", cut_at=b"data: [DONE]")
    ex.broke("eof_without_done")
    accounting.stream_end(ex, watch)
    assert ex.usage == Usage(27, 8, 22, None, Source.PARTIAL)
    assert ex.outcome is Outcome.UPSTREAM_ERROR and ex.waste is Waste.UPSTREAM_ERROR


def test_a_broken_stream_without_usage_leaves_what_was_relayed_to_be_counted() -> None:
    ex = routed()
    watch = watched("chat_stream_usage", cut_at=b'{"content":" colours"}')
    ex.broke("reset")
    accounting.stream_end(ex, watch)
    assert ex.usage is NO_USAGE and ex.pending_text == "Name three"


def test_a_stream_on_an_unmetered_endpoint_leaves_nothing_to_count() -> None:
    ex = routed(OTHER)
    accounting.stream_end(ex, watched("chat_stream", OTHER))
    assert ex.usage is NO_USAGE and ex.pending_text is None


# -- whole bodies -----------------------------------------------------------------------


def chat_body(finish_reason: str = "stop", usage: dict[str, int] | None = None) -> Any:
    body: dict[str, Any] = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Red, green"},
                "finish_reason": finish_reason,
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return orjson.loads(orjson.dumps(body))


def test_a_whole_body_with_usage_is_accounted_and_not_truncated() -> None:
    ex = routed()
    accounting.body_end(
        ex, chat_body(usage={"prompt_tokens": 9, "completion_tokens": 3}), complete=True
    )
    assert ex.usage == Usage(9, 3, None, None, Source.UPSTREAM) and ex.pending_text is None
    assert ex.waste is None and ex.outcome is Outcome.SUCCESS


def test_a_body_cut_by_its_cap_is_truncation_waste() -> None:
    ex = routed()
    usage = {"prompt_tokens": 9, "completion_tokens": 16}
    accounting.body_end(ex, chat_body("length", usage), complete=True)
    assert ex.waste is Waste.TRUNCATED and ex.usage.completion == 16
    incomplete = routed(RESPONSES)
    body = {"object": "response", "status": "incomplete", "output": [], "usage": {}}
    accounting.body_end(incomplete, body, complete=True)
    assert incomplete.waste is Waste.TRUNCATED


def test_a_whole_responses_body_marked_failed_is_an_upstream_error_with_its_usage() -> None:
    # A 2xx Responses body with "status": "failed" is response.failed, not streamed.
    ex = routed(RESPONSES)
    ex.answered(200)
    body = {
        "object": "response",
        "status": "failed",
        "error": {"code": "server_error", "message": "The model failed."},
        "output": [],
        "usage": {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17},
    }
    accounting.body_end(ex, body, complete=True)
    assert ex.outcome is Outcome.UPSTREAM_ERROR and ex.upstream_error == "in_band_error"
    assert ex.waste is Waste.UPSTREAM_ERROR
    assert (ex.usage.prompt, ex.usage.completion) == (12, 5)
    completed = routed(RESPONSES)
    completed.answered(200)
    accounting.body_end(completed, {**body, "status": "completed", "error": None}, complete=True)
    assert completed.outcome is Outcome.SUCCESS and completed.waste is None


def test_a_body_without_usage_leaves_its_text_to_be_counted() -> None:
    ex = routed()
    accounting.body_end(ex, chat_body(), complete=True)
    assert ex.usage is NO_USAGE and ex.pending_text == "Red, green"


def test_usage_in_a_body_that_broke_off_is_not_trusted() -> None:
    # A large body relayed in chunks that broke off: what was kept parsed, yet incomplete.
    ex = routed()
    ex.broke("reset", waste=False)
    accounting.body_end(
        ex, chat_body(usage={"prompt_tokens": 9, "completion_tokens": 3}), complete=False
    )
    assert ex.usage is NO_USAGE and ex.pending_text == "Red, green"


def test_a_body_that_is_not_json_leaves_an_empty_text_for_a_prompt_estimate() -> None:
    ex = routed()
    accounting.body_end(ex, None, complete=True)
    assert ex.usage is NO_USAGE and ex.pending_text == ""


def test_embeddings_report_prompt_tokens_only() -> None:
    ex = routed(EMBEDDINGS)
    body = {"object": "list", "data": [], "usage": {"prompt_tokens": 5, "total_tokens": 5}}
    accounting.body_end(ex, body, complete=True)
    assert ex.usage == Usage(5, None, None, None, Source.UPSTREAM)


def test_an_unmetered_body_is_accounted_only_when_it_says_its_usage() -> None:
    ex = routed(OTHER)
    accounting.body_end(ex, chat_body(), complete=True)
    assert ex.usage is NO_USAGE and ex.pending_text is None
    accounting.body_end(
        ex, chat_body(usage={"prompt_tokens": 2, "completion_tokens": 1}), complete=True
    )
    assert ex.usage == Usage(2, 1, None, None, Source.UPSTREAM)


# -- the client leaving -----------------------------------------------------------------


def test_a_client_leaving_after_the_final_event_keeps_success_and_reads_the_usage() -> None:
    ex, watch = routed(stream=True), watched("chat_stream_usage")
    ex.finished()
    accounting.client_left(ex, watch)
    assert ex.outcome is Outcome.SUCCESS and ex.status == "200" and ex.waste is None
    assert ex.usage == Usage(27, 8, 22, None, Source.UPSTREAM)


def test_a_client_leaving_mid_stream_is_a_499_with_partial_usage() -> None:
    ex, watch = routed(stream=True), watched("chat_stream_usage", cut_at=b"data: [DONE]")
    accounting.client_left(ex, watch)
    assert ex.outcome is Outcome.CLIENT_DISCONNECT and ex.status == "499"
    assert ex.waste is Waste.CLIENT_DISCONNECT
    assert ex.usage == Usage(27, 8, 22, None, Source.PARTIAL)


def test_a_client_leaving_mid_stream_without_usage_leaves_the_relayed_text() -> None:
    ex = routed(stream=True)
    accounting.client_left(ex, watched("chat_stream", cut_at=b'{"content":" colours"}'))
    assert ex.outcome is Outcome.CLIENT_DISCONNECT and ex.pending_text == "Name three"
    accounting.client_left(ex, None)  # the handler's own except clause: nothing changes
    assert ex.outcome is Outcome.CLIENT_DISCONNECT and ex.pending_text == "Name three"


def test_a_client_leaving_before_any_answer_still_counts_the_prompt() -> None:
    ex = routed()
    accounting.client_left(ex, None)
    assert ex.outcome is Outcome.CLIENT_DISCONNECT and ex.pending_text == ""


def test_a_client_leaving_before_the_upstream_was_reached_leaves_nothing_to_count() -> None:
    for ex in (exchange(), exchange(route=ROUTE, body={"model": "m"})):
        accounting.client_left(ex, None)
        assert ex.outcome is Outcome.CLIENT_DISCONNECT and ex.status == "499"
        assert ex.pending_text is None and ex.usage is NO_USAGE


def test_a_client_leaving_a_broken_stream_changes_nothing() -> None:
    ex, watch = routed(stream=True), watched("chat_stream", cut_at=b"data: [DONE]")
    ex.broke("reset")
    accounting.client_left(ex, watch)
    assert ex.outcome is Outcome.UPSTREAM_ERROR and ex.status == "502"
    assert ex.pending_text is None  # stream_end, in the relay, is what reads a broken stream


def test_a_client_leaving_after_the_final_event_of_a_stream_without_usage_keeps_its_text() -> None:
    # The relay and then the handler both see the client leave; the second call must not erase
    # the text the first left to be counted (a generic upstream reports no usage).
    ex = routed()
    watch = watched("chat_stream")
    ex.finished()
    accounting.client_left(ex, watch)
    text = ex.pending_text
    accounting.client_left(ex, None)
    assert text and ex.pending_text == text
    assert ex.outcome is Outcome.SUCCESS
