"""The stream watcher: a copy of each SSE event goes by it after (or, when the proxy must leave
its own usage chunk out, before) the client gets it. It notes the first token, the last usage,
the events that end a stream (per the endpoint table), errors, truncation, and the text relayed.
Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from .endpoints import Endpoint
from .sse import Event
from .usage import loads

USAGE_ONLY = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE_NULL = re.compile(rb'"usage"\s*:\s*null')
_LENGTH = re.compile(rb'"finish_reason"\s*:\s*"length"')
# Relayed chunk payloads are kept raw for a possible partial count (decoded only if the stream
# is cut short without usage), and reduced to their text once they add up to this many bytes,
# so a very long stream holds text rather than JSON.
_COMPACT_BYTES = 512 * 1024


class StreamWatch:
    """Watches SSE events go by: first token time, last usage, the end, errors, content."""

    __slots__ = (
        "_clock",
        "_endpoint",
        "_pending",
        "_pending_bytes",
        "_texts",
        "content_events",
        "ended",
        "error",
        "first_token_ns",
        "last_usage",
        "strip_usage",
        "truncated",
    )

    def __init__(self, clock: Any, endpoint: Endpoint, *, strip_usage: bool) -> None:
        self._clock = clock
        self._endpoint = endpoint
        self.strip_usage = strip_usage
        self.first_token_ns: int | None = None
        self.last_usage: bytes | None = None
        self.ended = False  # the event that ends this endpoint's stream was seen
        self.error = False  # an in-band error or failure event was seen
        self.truncated = False
        self.content_events = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._texts: list[str] = []

    def is_proxy_usage_chunk(self, event: Event) -> bool:
        """The usage-only chunk (`"choices":[]`) the proxy asked for, to be left out."""
        data = event.data
        return (
            self.strip_usage
            and b'"usage"' in data
            and USAGE_ONLY.search(data) is not None
            and _is_usage_only(data)
        )

    def on_event(self, event: Event) -> None:
        """Note one event that went by."""
        data = event.data
        if not data:
            return
        if data == b"[DONE]":
            self.ended = self.ended or self._endpoint.ends_with_done
            return
        if b'"usage"' in data and not _USAGE_NULL.search(data):
            self.last_usage = data
        if self.first_token_ns is None:
            parsed = loads(data)
            if parsed is not None and _has_content(parsed):
                self.first_token_ns = self._clock()
        if self.first_token_ns is not None:
            self.content_events += 1  # about one token each (vLLM, trtllm: one per chunk)
        if b'"error"' in data and data.lstrip().startswith(b'{"error"'):
            self.error = True
        elif self._endpoint.judged_by_events:
            self._judge(event)
        if b'"length"' in data and _LENGTH.search(data):
            self.truncated = True
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > _COMPACT_BYTES:
            self._compact()

    def _judge(self, event: Event) -> None:
        """Responses-style streams end and fail by event type: in the `event:` line, or only
        inside the data (`"type": "response.completed"`) when the upstream sends no names."""
        endpoint = self._endpoint
        kind: str | None = event.name.decode("utf-8", "replace") if event.name else None
        if kind is None:
            data = event.data
            if b'"response.' not in data and b'"error"' not in data:
                return
            parsed = loads(data)
            found = parsed.get("type") if isinstance(parsed, dict) else None
            kind = found if isinstance(found, str) else None
            if kind is None:
                return
        if kind in endpoint.failed_events:
            self.error = True
        elif kind in endpoint.completed_events:
            self.ended = True
            if kind in endpoint.truncated_events:
                self.truncated = True

    def _compact(self) -> None:
        for data in self._pending:
            parsed = loads(data)
            if parsed is not None:
                self._texts.append(text_of(parsed))
        self._pending.clear()
        self._pending_bytes = 0

    def text(self) -> str:
        """All generated text relayed so far (for counting tokens of a stream cut short)."""
        self._compact()
        return "".join(self._texts)


def _is_usage_only(data: bytes) -> bool:
    parsed = loads(data)
    return isinstance(parsed, dict) and parsed.get("choices") == [] and bool(parsed.get("usage"))


def _has_content(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("text"):
                return True
            delta = choice.get("delta")
            if isinstance(delta, dict) and (
                delta.get("content")
                or delta.get("reasoning_content")
                or delta.get("reasoning")
                or delta.get("tool_calls")
            ):
                return True
        return False
    kind = obj.get("type")
    return isinstance(kind, str) and kind.endswith(".delta") and bool(obj.get("delta"))


def text_of(obj: Any) -> str:
    """The generated text in a response body, stream chunk or Responses event."""
    if not isinstance(obj, dict):
        return ""
    parts: list[str] = []
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):
                parts.append(choice["text"])
            for key in ("delta", "message"):
                message = choice.get(key)
                if isinstance(message, dict):
                    for field_name in ("content", "reasoning_content", "reasoning"):
                        if isinstance(message.get(field_name), str):
                            parts.append(message[field_name])
                    if message.get("tool_calls"):
                        parts.append(_dumps(message["tool_calls"]))
    elif isinstance(obj.get("type"), str):
        if obj["type"].endswith(".delta") and isinstance(obj.get("delta"), str):
            parts.append(obj["delta"])
    elif isinstance(obj.get("output"), list):  # a whole Responses API body
        for item in obj["output"]:
            for content in item.get("content") or () if isinstance(item, dict) else ():
                if isinstance(content, dict) and isinstance(content.get("text"), str):
                    parts.append(content["text"])
    return "".join(parts)


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # nested past orjson's depth: nothing sane to count
        return ""
