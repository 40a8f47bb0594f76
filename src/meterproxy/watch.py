"""The stream watcher: a copy of each SSE event goes by it after (or, when the proxy must leave
its own usage chunk out, before) the client gets it. It notes the first token, the last usage,
the events that end a stream (per the endpoint table), errors, truncation, and the text relayed.
Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from .endpoints import Endpoint
from .sse import Event
from .usage import Source, Usage, from_body, loads

USAGE_ONLY = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE_NULL = re.compile(rb'"usage"\s*:\s*null')
_LENGTH = re.compile(rb'"finish_reason"\s*:\s*"length"')
# Relayed chunk payloads are kept raw for a possible partial count: decoded only if the stream
# is cut short without usage, so a short stream never pays for that. A stream that lives on
# holds its text instead (a few bytes a token rather than a ~200-byte chunk): past
# _COMPACT_BYTES once it is _COMPACT_AGE_NS past its first token (the long-lived streams that
# many clients hold at once, slow readers among them), and past _COMPACT_MAX_BYTES at any age.
_COMPACT_BYTES = 8 * 1024
_COMPACT_AGE_NS = 1_000_000_000
_COMPACT_MAX_BYTES = 512 * 1024


class UsageCut:
    """What the client would have received had the proxy not asked for usage, event by event:
    the usage-only chunk left out (or a chunk sent only to carry the usage), the `usage` member
    cut from other chunks (the `"usage":null` OpenAI adds to every chunk once usage is asked
    for, the running usage on content chunks) but kept on a finishing chunk, where engines that
    report it unasked put it. Bytes are cut, never re-encoded. An engine that moves members from its
    finishing chunk onto the usage chunk (llama.cpp's `timings`) gets them moved back: a
    finishing chunk is held until the next event shows whether that happened."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: Event | None = None

    @property
    def holding(self) -> bool:
        return self._held is not None

    def feed(self, event: Event) -> list[bytes]:
        data = event.data
        if (
            self._held is None
            and b'"usage":null' in data
            and b'"finish_reason":"' not in data
            and _one_line(event)
        ):
            # OpenAI's content chunk once usage is asked for (so: most of such a stream). What
            # the general path below does with it, in one step: no usage-only chunk (a null
            # usage), nothing held, nothing to hold; its `"usage":null` is cut.
            rest = _without_null_usage(data)
            if rest is not None and _null_usage(data):
                return [b"data: " + rest + b"\n\n"]
        out: list[bytes] = []
        held, self._held = self._held, None
        if b'"usage"' in data and USAGE_ONLY.search(data) is not None and _is_usage_only(data):
            if held is not None:
                out.append(_with_moved_members(held, data))
            return out
        if held is not None:
            out.extend(self._release(held))
        if b'"finish_reason":"' in data and _one_line(event):
            self._held = event  # the usage chunk may follow, with members moved from it
            return out
        kept = _cut_usage(event)
        if kept is not None:
            out.append(kept)
        return out

    def flush(self) -> list[bytes]:
        held, self._held = self._held, None
        return [] if held is None else self._release(held)

    @staticmethod
    def _release(held: Event) -> list[bytes]:
        kept = _cut_usage(held)
        return [kept] if kept is not None else []


def _one_line(event: Event) -> bool:
    """The event's bytes are exactly `data: <its data>\\n\\n`, the form servers send (checked
    without building that: this runs for every chunk of an OpenAI stream)."""
    raw, data = event.raw, event.data
    return (
        len(raw) == len(data) + 8
        and raw.startswith(b"data: ")
        and raw.endswith(b"\n\n")
        and raw.startswith(data, 6)
    )


def _cut_usage(event: Event) -> bytes | None:
    data = event.data
    if b'"usage"' not in data or not _one_line(event):
        return event.raw  # nothing to cut, or not the one-line form servers send
    stripped = _without_usage(data)
    if stripped is None:
        return event.raw
    rest, had_value = stripped
    if had_value and _carries_nothing(rest):
        return None  # a chunk sent only to carry the usage (LiteLLM's empty delta)
    if had_value and b'"finish_reason":"' in data:
        return event.raw  # usage on the finishing chunk is sent unasked (llama.cpp completions)
    return b"data: " + rest + b"\n\n"


def _with_moved_members(held: Event, usage_chunk: bytes) -> bytes:
    """The held finishing chunk, with the members that only the usage chunk carries (other than
    `usage` itself) appended in their order, as the engine writes them without usage."""
    kept = _cut_usage(held) or held.raw
    finishing, extra = loads(kept[6:-2]), loads(usage_chunk)
    if not isinstance(finishing, dict) or not isinstance(extra, dict):
        return kept
    moved = [k for k in extra if k != "usage" and k not in finishing]
    if not moved:
        return kept
    members = b"".join(b"," + orjson.dumps(k) + b":" + _member_bytes(usage_chunk, k) for k in moved)
    body = kept[6:-2].rstrip()
    if not body.endswith(b"}"):
        return kept
    return b"data: " + body[:-1] + members + b"}\n\n"


def _member_bytes(data: bytes, key: str) -> bytes:
    """The exact bytes of a top-level member's value (re-encoded only if they cannot be cut)."""
    at = data.rfind(orjson.dumps(key) + b":")
    if at >= 0:
        start = at + len(key) + 3
        end = _value_end(data, start)
        if end is not None:
            return data[start:end]
    parsed = loads(data)
    return orjson.dumps(parsed.get(key)) if isinstance(parsed, dict) else b"null"


class StreamWatch:
    """Watches SSE events go by: first token time, last usage, the end, errors, content."""

    __slots__ = (
        "_clock",
        "_compact_at",
        "_endpoint",
        "_ends_with_done",
        "_judged",
        "_long_lived",
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
        "usage_only",
    )

    def __init__(self, clock: Any, endpoint: Endpoint, *, strip_usage: bool) -> None:
        self._clock = clock
        self._endpoint = endpoint
        self._ends_with_done = endpoint.ends_with_done  # read once: checked for every event
        self._judged = endpoint.judged_by_events
        self.strip_usage = strip_usage
        self.first_token_ns: int | None = None
        self.last_usage: bytes | None = None
        # Every usage-only chunk (`"choices": []`): engines that report per choice (llama.cpp
        # with n > 1) send one each, where vLLM sends one for the whole request.
        self.usage_only: list[bytes] = []
        self.ended = False  # the event that ends this endpoint's stream was seen
        self.error = False  # an in-band error or failure event was seen
        self.truncated = False
        self.content_events = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._long_lived = False  # past _COMPACT_AGE_NS since the first token
        self._compact_at = _COMPACT_BYTES  # pending bytes at which compacting is considered
        self._texts: list[str] = []

    def on_event(self, event: Event) -> None:
        """Note one event that went by."""
        data = event.data
        if not data:
            return
        if data == b"[DONE]":
            self.ended = self.ended or self._ends_with_done
            return
        if b'"usage"' in data and not _USAGE_NULL.search(data):
            self.last_usage = data
            if USAGE_ONLY.search(data) is not None:
                self.usage_only.append(data)
        if self.first_token_ns is not None:
            self.content_events += 1  # about one token each (vLLM, trtllm: one per chunk)
        else:
            parsed = loads(data)
            if parsed is not None and _has_content(parsed):
                self.first_token_ns = self._clock()
                self.content_events += 1
        if b'"error"' in data and data.lstrip().startswith(b'{"error"'):
            self.error = True
        elif self._judged:
            self._judge(event)
        if b'"length"' in data and _LENGTH.search(data):
            self.truncated = True
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > self._compact_at:
            self._maybe_compact()

    @property
    def pending_bytes(self) -> int:
        """Raw payload bytes held for a possible count (bounded once a stream is long-lived)."""
        return self._pending_bytes

    def on_whole_events(self, chunk: bytes, count: int) -> bool:
        """Note `count` events at once: `chunk` is that many whole one-line `data:` events
        (sse.whole_data_events). Done only when none of them can change anything but the first
        token, the count and the text kept (no usage, error, truncation, end or event type in
        them): then it is what `on_event` would do for each, without an event object or a look
        at each. False: the caller feeds them one by one."""
        if (
            self._judged
            or b'"usage"' in chunk
            or b'"error"' in chunk
            or b'"length"' in chunk
            or b"[DONE]" in chunk
        ):
            return False
        payloads = [chunk[6:-2]] if count == 1 else chunk[6:-2].split(b"\n\ndata: ")
        if self.first_token_ns is not None:
            self.content_events += count
        else:  # look for the first token, as on_event does, then count from it
            for i, data in enumerate(payloads):
                parsed = loads(data)
                if parsed is not None and _has_content(parsed):
                    self.first_token_ns = self._clock()
                    self.content_events += count - i
                    break
        self._pending.extend(payloads)
        self._pending_bytes += len(chunk) - 8 * count
        if self._pending_bytes > self._compact_at:
            self._maybe_compact()
        return True

    def usage(self, source: Source) -> Usage | None:
        """What the stream reported: its last usage (cumulative, never summed), or — when it
        sent one usage-only chunk per choice — the prompt once and the choices' tokens summed."""
        if len(self.usage_only) > 1:
            parts = [from_body(loads(data)) for data in self.usage_only]
            found = [p for p in parts if p is not None]
            if found:
                return Usage(
                    prompt=_max(p.prompt for p in found),
                    completion=_sum(p.completion for p in found),
                    cached_prompt=_max(p.cached_prompt for p in found),
                    reasoning=_sum(p.reasoning for p in found),
                    source=source,
                )
        if self.last_usage is None:
            return None
        last = from_body(loads(self.last_usage))
        return None if last is None else last._replace(source=source)

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

    def _maybe_compact(self) -> None:
        """Past _COMPACT_BYTES: compact a long-lived stream (or one past the hard bound); a young
        one is looked at again after another _COMPACT_BYTES (the clock is read that rarely)."""
        if not self._long_lived:
            first = self.first_token_ns
            self._long_lived = first is not None and self._clock() - first > _COMPACT_AGE_NS
        if self._long_lived or self._pending_bytes > _COMPACT_MAX_BYTES:
            self._compact()
            self._compact_at = _COMPACT_BYTES
        else:
            self._compact_at = self._pending_bytes + _COMPACT_BYTES

    def _compact(self) -> None:
        # One string per compaction: a string per chunk would cost more than the chunk's text.
        self._texts.append("".join(text_of(loads(data)) for data in self._pending))
        self._pending.clear()
        self._pending_bytes = 0

    def text(self) -> str:
        """All generated text relayed so far (for counting tokens of a stream cut short)."""
        self._compact()
        return "".join(self._texts)


def _max(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _sum(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _without_usage(data: bytes) -> tuple[bytes, bool] | None:
    """`data` without its top-level `usage` member, and whether that member had a value; the
    bytes are cut, never re-encoded, so everything else stays as the upstream wrote it. None
    when there is no such member (or the cut would not be exactly that member)."""
    parsed = loads(data)
    if not isinstance(parsed, dict) or "usage" not in parsed:
        return None
    had_value = parsed["usage"] is not None
    rest = _without_null_usage(data) if not had_value else None
    if rest is None:
        del parsed["usage"]
        rest = _cut_checked(data, parsed)
    return None if rest is None else (rest, had_value)


def _cut_checked(data: bytes, rest: dict[str, Any]) -> bytes | None:
    """`data` with one `usage` member cut out so that what is left parses to `rest`, trying
    the occurrences from the last."""
    at = data.rfind(b'"usage"')
    while at > 0:
        end = _value_end(data, data.find(b":", at + 7) + 1)
        before = data[:at].rstrip()
        if end is not None and before.endswith(b","):
            candidate = before[:-1] + data[end:]
        elif end is not None and before.endswith(b"{"):
            after = data[end:].lstrip()
            candidate = before + (after[1:] if after.startswith(b",") else after)
        else:
            candidate = b""
        if candidate and loads(candidate) == rest:
            return candidate
        at = data.rfind(b'"usage"', 0, at)
    return None


def _null_usage(data: bytes) -> bool:
    """`data` is a JSON object whose top-level `usage` is null."""
    parsed = loads(data)
    return isinstance(parsed, dict) and "usage" in parsed and parsed["usage"] is None


def _without_null_usage(data: bytes) -> bytes | None:
    """The fast way for `"usage":null` (OpenAI's, on every chunk once usage is asked for),
    for `data` known to be an object whose top-level `usage` is null. With no `\\u` escape
    in the bytes every key is written as itself, so when `"usage"` occurs exactly once that is
    the top-level key (a nested key or a string value would be a second occurrence), and
    cutting it with its value leaves exactly the rest: no second parse to check. None when
    that cannot be told this way (the caller then cuts and checks)."""
    if data.count(b'"usage"') != 1 or b"\\u" in data:
        return None
    at = data.find(b'"usage"')
    if data.startswith(b":null", at + 7):  # as servers write it
        end = at + 12
    else:
        colon = _skip_space(data, at + 7)
        if data[colon : colon + 1] != b":":
            return None
        value = _skip_space(data, colon + 1)
        if data[value : value + 4] != b"null":
            return None
        end = value + 4
    before = data[:at].rstrip()
    if before.endswith(b","):
        return before[:-1] + data[end:]
    if before.endswith(b"{"):
        after = data[end:].lstrip()
        return before + (after[1:] if after.startswith(b",") else after)
    return None


def _skip_space(data: bytes, i: int) -> int:
    n = len(data)
    while i < n and data[i] in b" \t\r\n":
        i += 1
    return i


def _value_end(data: bytes, start: int) -> int | None:
    """Where the JSON value starting at `start` (after optional spaces) ends."""
    i, n = start, len(data)
    while i < n and data[i] in b" \t\r\n":
        i += 1
    if i >= n or start <= 0:
        return None
    if data[i : i + 4] == b"null":
        return i + 4
    if data[i] != 0x7B:  # {
        return None
    depth, in_string, escaped = 0, False, False
    for j in range(i, n):
        c = data[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _carries_nothing(data: bytes) -> bool:
    """A chunk whose choices hold nothing: no content, no role, no finish_reason."""
    parsed = loads(data)
    if not isinstance(parsed, dict):
        return False
    choices = parsed.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return False
        if choice.get("delta") or choice.get("text") or choice.get("logprobs"):
            return False
    return True


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
