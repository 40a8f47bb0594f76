"""The endpoint table: its invariants, every path routed to its own handler, and what marks a
whole answer as cut by its output cap, endpoint by endpoint."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from meterproxy import config
from meterproxy.app import create_app
from meterproxy.endpoints import (
    BY_NAME,
    BY_PATH,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    OTHER,
    RESPONSES,
    TABLE,
    Endpoint,
    truncated_body,
)


def test_names_and_paths_are_unique_and_only_other_has_no_path() -> None:
    assert len(BY_NAME) == len(TABLE) == 5
    assert set(BY_PATH.values()) == set(TABLE) - {OTHER}
    assert [e for e in TABLE if e.path is None] == [OTHER]
    assert all(path.startswith("/v1/") for path in BY_PATH)
    assert BY_NAME["other"] is OTHER and BY_PATH["/v1/responses"] is RESPONSES


@pytest.mark.parametrize("endpoint", TABLE, ids=lambda e: e.name)
def test_each_entry_is_consistent(endpoint: Endpoint) -> None:
    assert endpoint.metered == endpoint.json_body
    if not endpoint.streams:
        assert not endpoint.ends_with_done and not endpoint.asks_usage
        assert not endpoint.completed_events
    # A stream ends either with [DONE] or with an event of its own, never both, and a
    # truncated end is one of the ends.
    assert not (endpoint.ends_with_done and endpoint.judged_by_events)
    assert endpoint.truncated_events <= endpoint.completed_events
    if endpoint.fill_field is not None:
        assert endpoint.fill_field in endpoint.max_token_fields
    if not endpoint.generates:
        assert not endpoint.max_token_fields and endpoint.fill_field is None
        assert not endpoint.choice_fields
    if endpoint.metered:
        assert endpoint.prompt_fields and endpoint.genai_operation is not None
    else:
        assert not endpoint.prompt_fields and endpoint.genai_operation is None


def test_the_streams_that_end_with_done_and_those_judged_by_events() -> None:
    assert {e.name for e in TABLE if e.ends_with_done} == {"chat_completions", "completions"}
    assert {e.name for e in TABLE if e.judged_by_events} == {"responses"}
    assert {e.name for e in TABLE if e.asks_usage} == {"chat_completions", "completions"}


def _app() -> Any:
    settings = config.parse(
        {
            "upstreams": [{"name": "u", "url": "http://127.0.0.1:9/v1"}],
            "ledger": {"enabled": False},
        },
        {},
    )
    return create_app(settings, registry=CollectorRegistry(), energy=None)


@pytest.mark.parametrize("endpoint", [e for e in TABLE if e.path], ids=lambda e: e.name)
async def test_every_path_in_the_table_is_routed_to_its_own_handler(endpoint: Endpoint) -> None:
    app = _app()
    assert endpoint.path is not None
    match = await app.router.resolve(make_mocked_request("POST", endpoint.path, app=app))
    assert match.handler.__name__ == endpoint.name


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/files", "/v1/images/generations"])
async def test_any_other_v1_path_is_the_other_endpoint(path: str) -> None:
    app = _app()
    match = await app.router.resolve(make_mocked_request("POST", path, app=app))
    assert match.handler.__name__ == OTHER.name


def _chat(*reasons: str | None) -> dict[str, Any]:
    return {"choices": [{"index": i, "finish_reason": r} for i, r in enumerate(reasons)]}


@pytest.mark.parametrize(
    ("endpoint", "body", "cut"),
    [
        (CHAT, _chat("length"), True),
        (CHAT, _chat("stop", "length"), True),  # any one answer cut by the cap
        (CHAT, _chat("stop"), False),
        (CHAT, _chat("tool_calls", None), False),
        (CHAT, {"choices": "length"}, False),
        (CHAT, {"choices": ["length"]}, False),
        (CHAT, {"status": "incomplete"}, False),  # a Responses marker means nothing here
        (COMPLETIONS, _chat("length"), True),
        (COMPLETIONS, _chat("stop"), False),
        (EMBEDDINGS, {"object": "list", "data": [{"embedding": [0.1]}]}, False),
        (RESPONSES, {"object": "response", "status": "incomplete"}, True),
        (RESPONSES, {"object": "response", "status": "completed"}, False),
        (RESPONSES, _chat("length"), False),  # the response object is what says so
        (CHAT, None, False),
        (CHAT, [_chat("length")], False),
        (RESPONSES, "incomplete", False),
    ],
)
def test_a_whole_answer_cut_by_its_cap(endpoint: Endpoint, body: Any, cut: bool) -> None:
    assert truncated_body(endpoint, body) is cut
