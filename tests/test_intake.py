"""Intake without I/O: request targets, JSON depth, OpenAI-typed fields, client strings."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterproxy import errors, intake
from meterproxy.endpoints import CHAT, COMPLETIONS, RESPONSES

from .factories import exchange


@pytest.mark.parametrize(
    "target",
    [
        "http://other/v1/chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/v1/../admin",
        "/v1/./chat/completions",
        "/v1/%2e%2e/secret",
        "/v1/chat/%2E%2E/x",
        "/v1//chat/completions",
        "/v1/chat\\completions",
        "/v1/a%5cb",
        "/v1/chat/completions/",
        "/v1/chat/completions;x",
    ],
)
def test_targets_that_could_reach_another_path_are_refused(target: str) -> None:
    with pytest.raises(errors.InvalidPath):
        intake.check_target(target)


def test_ordinary_targets_pass() -> None:
    for target in ("/v1/chat/completions", "/v1/files/file-1?purpose=x", "/v1/a.b/c..d"):
        intake.check_target(target)


def nest(depth: int) -> bytes:
    return b'{"model": "m", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def test_json_nested_too_deep_is_a_400_and_moderate_nesting_is_fine() -> None:
    assert intake.parse_json(nest(intake.MAX_JSON_DEPTH - 2))["model"] == "m"
    for depth in (intake.MAX_JSON_DEPTH, 300, 1000, 5000):
        with pytest.raises(errors.MalformedJSON):
            intake.parse_json(nest(depth))
    with pytest.raises(errors.MalformedJSON):
        intake.maybe_json(nest(400))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": 1}, "stream"),
        ({"stream": "yes"}, "stream"),
        ({"stream": None, "n": "2"}, "n"),
        ({"n": 2.0}, "n"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 5000.0}, "max_tokens"),
        ({"max_completion_tokens": "5000"}, "max_completion_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"stream_options": []}, "stream_options"),
        ({"stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ],
)
def test_fields_are_typed_as_openai_types_them(body: dict[str, Any], param: str) -> None:
    with pytest.raises((errors.InvalidType, errors.InvalidValue)) as caught:
        intake.read_facts(exchange(endpoint=CHAT), {"model": "m", **body})
    assert caught.value.param == param and caught.value.status == 400


def test_facts_that_decide_metering() -> None:
    ex = exchange(endpoint=COMPLETIONS)
    intake.read_facts(ex, {"stream": True, "n": 3, "best_of": 5, "user": "bob\n\x00" + "x" * 999})
    assert ex.stream and ex.choices == 5
    assert ex.client_user is not None and len(ex.client_user) == intake.MAX_USER_CHARS
    assert "\n" not in ex.client_user and "\x00" not in ex.client_user
    ex = exchange(endpoint=RESPONSES)
    intake.read_facts(ex, {"stream": False, "max_output_tokens": 7})
    assert not ex.stream and ex.choices == 1
    assert intake.output_cap(RESPONSES, {"max_output_tokens": 7}) == ("max_output_tokens", 7)
    assert intake.output_cap(CHAT, {"max_tokens": 5, "max_completion_tokens": 9}) == (
        "max_completion_tokens",
        9,
    )


@given(st.text(max_size=2000))
def test_client_strings_are_bounded_printable_and_valid_utf8(value: str) -> None:
    cleaned = intake.clean_text(value, 128)
    assert len(cleaned) <= 128
    assert cleaned.isprintable()
    cleaned.encode("utf-8")  # never raises: no lone surrogates


def test_undecodable_header_bytes_become_replacement_characters() -> None:
    header = b"id-\xff\xfe".decode("utf-8", "surrogateescape")  # how aiohttp hands them over
    assert intake.client_request_id(header) == "id-??"
    assert intake.client_request_id("") is None


def test_task_ids_are_bounded_and_blank_means_a_task_of_its_own() -> None:
    assert intake.task_id(None) is None and intake.task_id("  ") is None
    assert intake.task_id(" ticket-42 ") == "ticket-42"
    assert intake.task_id("t" * 1000) == "t" * intake.MAX_TASK_ID_CHARS
    assert intake.task_id("a\x1bb") == "a\ufffdb"
