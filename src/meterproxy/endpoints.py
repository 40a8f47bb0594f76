"""The endpoint table: one entry per OpenAI endpoint the proxy meters, holding every rule that
differs between endpoints (how it streams, how its stream ends, where its output cap is, what
marks truncation, how its prompt is counted). No other module compares endpoint names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # the metrics and ledger label
    path: str | None  # its route under the proxy; None: any other /v1/* path
    json_body: bool  # the body must be a JSON object naming its `model`
    streams: bool  # `"stream": true` answers with server-sent events
    ends_with_done: bool  # a whole stream ends with `data: [DONE]`
    asks_usage: bool  # the proxy may ask for `stream_options.include_usage`
    completed_events: frozenset[str] = frozenset()  # event types that end a stream well...
    truncated_events: frozenset[str] = frozenset()  # ...that end it cut by the output cap
    failed_events: frozenset[str] = frozenset()  # ...that end it with an upstream failure
    max_token_fields: tuple[str, ...] = ()  # where the output cap is, preferred first
    fill_field: str | None = None  # where a tenant's cap is written when the client set none
    choice_fields: tuple[str, ...] = ()  # how many answers one request asks for (n, best_of)
    generates: bool = True  # has completion tokens (embeddings: no)
    prompt_fields: tuple[str, ...] = ()  # the fields whose tokens are the prompt
    messages: bool = False  # the first prompt field may be a list of chat messages
    reply_priming: bool = False  # the chat template adds tokens to prime the reply
    genai_operation: str | None = None  # OpenTelemetry's gen_ai.operation.name

    @property
    def metered(self) -> bool:
        """Usage is read and estimated (every endpoint but `other`)."""
        return self.json_body

    @property
    def judged_by_events(self) -> bool:
        return bool(self.completed_events)


CHAT = Endpoint(
    name="chat_completions",
    path="/v1/chat/completions",
    json_body=True,
    streams=True,
    ends_with_done=True,
    asks_usage=True,
    max_token_fields=("max_completion_tokens", "max_tokens"),
    fill_field="max_tokens",
    choice_fields=("n",),
    prompt_fields=("messages",),
    messages=True,
    reply_priming=True,
    genai_operation="chat",
)
COMPLETIONS = Endpoint(
    name="completions",
    path="/v1/completions",
    json_body=True,
    streams=True,
    ends_with_done=True,
    asks_usage=True,
    max_token_fields=("max_tokens",),
    fill_field="max_tokens",
    choice_fields=("n", "best_of"),
    prompt_fields=("prompt",),
    genai_operation="text_completion",
)
EMBEDDINGS = Endpoint(
    name="embeddings",
    path="/v1/embeddings",
    json_body=True,
    streams=False,
    ends_with_done=False,
    asks_usage=False,
    generates=False,
    prompt_fields=("input",),
    genai_operation="embeddings",
)
RESPONSES = Endpoint(
    name="responses",
    path="/v1/responses",
    json_body=True,
    streams=True,
    ends_with_done=False,
    asks_usage=False,  # Responses streams always end with their usage
    completed_events=frozenset({"response.completed", "response.incomplete", "response.failed"}),
    truncated_events=frozenset({"response.incomplete"}),
    failed_events=frozenset({"response.failed", "error"}),
    max_token_fields=("max_output_tokens",),
    fill_field="max_output_tokens",
    prompt_fields=("input", "instructions"),
    messages=True,
    genai_operation="chat",
)
OTHER = Endpoint(
    name="other",
    path=None,
    json_body=False,
    streams=False,
    ends_with_done=False,
    asks_usage=False,
    generates=False,
)

TABLE: tuple[Endpoint, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, OTHER)
BY_PATH: Mapping[str, Endpoint] = {e.path: e for e in TABLE if e.path is not None}
BY_NAME: Mapping[str, Endpoint] = {e.name: e for e in TABLE}


def failed_body(endpoint: Endpoint, body: Any) -> bool:
    """A whole (non-streamed) answer that the upstream marks as failed inside a 2xx body:
    Responses' `"status": "failed"`, the non-streamed form of its `response.failed` event."""
    return (
        bool(endpoint.failed_events) and isinstance(body, dict) and body.get("status") == "failed"
    )


def truncated_body(endpoint: Endpoint, body: Any) -> bool:
    """A whole (non-streamed) answer cut by its output cap."""
    if not isinstance(body, dict):
        return False
    if endpoint.truncated_events:  # Responses: the response object says so
        return body.get("status") == "incomplete"
    choices = body.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") == "length" for c in choices
    )
