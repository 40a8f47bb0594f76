"""Usage extraction: zero is not unknown; every shape OpenAI-compatible servers send."""

from __future__ import annotations

from meterproxy.usage import Source, Usage, from_body


def test_chat_usage_with_details() -> None:
    body = {
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 0,
            "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
    }
    assert from_body(body) == Usage(10, 0, 4, 0, Source.UPSTREAM)


def test_unknown_is_none_not_zero() -> None:
    usage = from_body({"usage": {"prompt_tokens": 7, "prompt_tokens_details": None}})
    assert usage == Usage(7, None, None, None, Source.UPSTREAM)
    assert from_body({"usage": None}) is None
    assert from_body({"usage": {"total_tokens": 3}}) is None
    assert from_body([1, 2]) is None
    assert from_body({"usage": {"prompt_tokens": -1, "completion_tokens": True}}) is None


def test_responses_api_usage_and_completed_event() -> None:
    usage = {
        "input_tokens": 9,
        "output_tokens": 5,
        "input_tokens_details": {"cached_tokens": 2},
        "output_tokens_details": {"reasoning_tokens": 3},
    }
    assert from_body({"usage": usage}) == Usage(9, 5, 2, 3, Source.UPSTREAM)
    event = {"type": "response.completed", "response": {"usage": usage}}
    assert from_body(event) == Usage(9, 5, 2, 3, Source.UPSTREAM)
