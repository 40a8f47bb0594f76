"""Token usage values that know zero from unknown, and where each number came from.

Extraction reads the `usage` object of chat/completions/embeddings bodies and stream chunks
(`prompt_tokens`, `completion_tokens`, `*_details`) and of the Responses API
(`input_tokens`, `output_tokens`, `*_details`).
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import orjson


class Source(str, enum.Enum):
    UPSTREAM = "upstream"  # the upstream's own final usage
    ESTIMATE = "estimate"  # counted by us with a tokenizer: the upstream reported none
    PARTIAL = "partial"  # the stream was cut short; completion counted from what was relayed
    NONE = "none"  # nothing to count (the request never reached an upstream)


class Usage(NamedTuple):
    """Token counts of one request (a named tuple: one or two are made per request, and a
    frozen dataclass sets each field through `object.__setattr__`)."""

    prompt: int | None = None
    completion: int | None = None
    cached_prompt: int | None = None
    reasoning: int | None = None
    source: Source = Source.NONE

    @property
    def known(self) -> bool:
        return self.prompt is not None or self.completion is not None


NO_USAGE = Usage()


def loads(payload: bytes) -> Any:
    """Parsed JSON, or None when the bytes are not JSON."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def from_usage_object(obj: Any, source: Source = Source.UPSTREAM) -> Usage | None:
    """A Usage from an OpenAI `usage` object, or None if `obj` is not one."""
    if not isinstance(obj, dict):
        return None
    if "input_tokens" in obj or "output_tokens" in obj:  # Responses API
        prompt, completion = _int(obj.get("input_tokens")), _int(obj.get("output_tokens"))
        prompt_details, completion_details = (
            obj.get("input_tokens_details"),
            obj.get("output_tokens_details"),
        )
    else:
        prompt, completion = _int(obj.get("prompt_tokens")), _int(obj.get("completion_tokens"))
        prompt_details, completion_details = (
            obj.get("prompt_tokens_details"),
            obj.get("completion_tokens_details"),
        )
    if prompt is None and completion is None:
        return None
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else None
    reasoning = (
        _int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else None
    )
    return Usage(
        prompt=prompt,
        completion=completion,
        cached_prompt=cached,
        reasoning=reasoning,
        source=source,
    )


def from_body(body: Any) -> Usage | None:
    """Usage of a non-streamed response body, or a stream chunk / Responses event."""
    if not isinstance(body, dict):
        return None
    found = from_usage_object(body.get("usage"))
    if found is None and isinstance(body.get("response"), dict):  # response.completed event
        found = from_usage_object(body["response"].get("usage"))
    return found
