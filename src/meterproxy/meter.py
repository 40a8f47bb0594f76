"""The per-request record, the stream watcher beside the relay, and settlement.

Everything here is synchronous and pure: `Meter.settle` runs once per request inside the
request's single `finally`, with no `await`, so cancellation cannot split a settlement.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .sse import Event
from .usage import NO_USAGE, Usage, loads

if TYPE_CHECKING:
    from .quota import Ticket

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # monotonic nanoseconds
Sink = Callable[["Record"], None]

NO_LABEL = "_none"  # model/upstream label before a request is routed
STATUS_CLIENT_DISCONNECT = "499"
STATUS_STREAM_BROKEN = "502"


class Waste(str, enum.Enum):
    CLIENT_DISCONNECT = "client_disconnect"
    TRUNCATED = "truncated"
    UPSTREAM_ERROR = "upstream_error"


@dataclass(slots=True)
class Record:
    """What one request did; filled in along the request path, frozen by settlement."""

    request_id: str
    endpoint: str
    started_ns: int
    tenant: str = "anonymous"
    model: str = NO_LABEL
    upstream: str = NO_LABEL
    status: str = "500"
    reached_upstream: bool = False
    streamed: bool = False
    first_token_ns: int | None = None
    ended_ns: int = 0
    usage: Usage = NO_USAGE
    estimated: bool = False
    waste_reason: str | None = None
    upstream_error: str | None = None  # a kind from the proxy's failure table
    client_request_id: str | None = None
    client_user: str | None = None
    gpu_seconds: float = 0.0  # this request's share of its upstream's wall time
    energy_j: float | None = None  # attributed GPU energy, once measured
    cost_usd: float = 0.0
    priced: bool = False  # False: no price known for this model/upstream (cost 0, not a guess)
    ticket: Ticket | None = None  # what quota admission reserved, settled with the request
    settled: bool = False

    @property
    def duration_ns(self) -> int:
        return self.ended_ns - self.started_ns

    @property
    def ttft_ns(self) -> int | None:
        return None if self.first_token_ns is None else self.first_token_ns - self.started_ns

    @property
    def tpot_ns(self) -> int | None:
        completion = self.usage.completion
        if not self.streamed or self.first_token_ns is None or not completion or completion < 2:
            return None
        return (self.ended_ns - self.first_token_ns) // (completion - 1)


class Meter:
    """Settles records exactly once and hands each to every sink (metrics, ledger, tests)."""

    def __init__(
        self,
        clock: Clock,
        sinks: Sequence[Sink],
        on_error: Callable[[], None],
        annotate: Callable[[Record], None] | None = None,
    ) -> None:
        """`annotate` completes a record (cost) before the sinks see it."""
        self.clock = clock
        self._sinks = tuple(sinks)
        self._on_error = on_error
        self._annotate = annotate
        # A hook that may hold a settled record until its energy is final; it calls back
        # `complete` (synchronously, on the loop) exactly once.
        self.defer: Callable[[Record, Callable[[Record], None]], bool] | None = None

    def settle(self, record: Record) -> None:
        if record.settled:
            raise RuntimeError(f"request {record.request_id} settled twice")
        record.settled = True
        record.ended_ns = self.clock()
        if self.defer is not None and self.defer(record, self.complete):
            return
        self.complete(record)

    def complete(self, record: Record) -> None:
        if self._annotate is not None:
            try:
                self._annotate(record)
            except Exception:  # same guard as the sinks: count, log, still settle
                self._on_error()
                log.exception("annotating request %s failed", record.request_id)
        for sink in self._sinks:
            try:
                sink(record)
            except Exception:  # the one broad guard: a metering bug must not fail a request
                self._on_error()
                log.exception("metering sink %r failed for request %s", sink, record.request_id)


USAGE_ONLY = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE_NULL = re.compile(rb'"usage"\s*:\s*null')
_LENGTH = re.compile(rb'"finish_reason"\s*:\s*"length"')
# Relayed chunk payloads are kept raw for a possible partial count (decoded only if the stream
# is cut short without usage), and reduced to their text once they add up to this many bytes,
# so a very long stream holds text rather than JSON.
_COMPACT_BYTES = 512 * 1024


class StreamWatch:
    """Watches SSE events go by: first token time, last usage, [DONE], errors, content."""

    __slots__ = (
        "_clock",
        "_pending",
        "_pending_bytes",
        "_texts",
        "content_events",
        "done",
        "error",
        "first_token_ns",
        "last_usage",
        "strip_usage",
        "terminal",
        "truncated",
    )

    def __init__(self, clock: Clock, *, strip_usage: bool) -> None:
        self._clock = clock
        self.strip_usage = strip_usage
        self.first_token_ns: int | None = None
        self.last_usage: bytes | None = None
        self.done = False  # `data: [DONE]` seen
        self.terminal = False  # a Responses API terminal event seen
        self.error = False  # an in-band error event seen
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
            self.done = True
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
        elif event.name is not None:
            if event.name in (b"response.completed", b"response.incomplete"):
                self.terminal = True
            elif event.name in (b"error", b"response.failed"):
                self.error = True
        if b'"length"' in data and _LENGTH.search(data):
            self.truncated = True
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > _COMPACT_BYTES:
            self._compact()

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
                        parts.append(orjson.dumps(message["tool_calls"]).decode())
    elif isinstance(obj.get("type"), str):
        if obj["type"].endswith(".delta") and isinstance(obj.get("delta"), str):
            parts.append(obj["delta"])
    elif isinstance(obj.get("output"), list):  # a whole Responses API body
        for item in obj["output"]:
            for content in item.get("content") or () if isinstance(item, dict) else ():
                if isinstance(content, dict) and isinstance(content.get("text"), str):
                    parts.append(content["text"])
    return "".join(parts)
