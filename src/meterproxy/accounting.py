"""Usage at the end of a request: the upstream's own numbers when it reported them, else a
labelled tiktoken count of what was asked and what was relayed."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from . import usage
from .meter import STATUS_CLIENT_DISCONNECT, Record, StreamWatch, Waste, text_of
from .routing import Route
from .runtime import Runtime
from .tokens import off_loop

log = logging.getLogger(__name__)


async def settle_body(
    runtime: Runtime,
    record: Record,
    route: Route,
    body: dict[str, Any],
    parsed: Any,
    *,
    complete: bool,
) -> None:
    """Usage of a non-streamed response: the upstream's, else counted off the loop."""
    found = usage.from_body(parsed)
    if found is not None and complete:
        record.usage = found
    elif record.endpoint != "other":
        text = text_of(parsed)
        record.usage = await _estimate(runtime, record, route, body, text, complete=complete)
    _note_truncation(record, parsed)


def _note_truncation(record: Record, parsed: Any) -> None:
    if record.waste_reason is not None or not isinstance(parsed, dict):
        return
    choices = parsed.get("choices")
    if isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") == "length" for c in choices
    ):
        record.waste_reason = Waste.TRUNCATED.value
    elif parsed.get("status") == "incomplete":  # Responses API cut by max_output_tokens
        record.waste_reason = Waste.TRUNCATED.value


async def _estimate(
    runtime: Runtime,
    record: Record,
    route: Route,
    body: dict[str, Any],
    text: str,
    *,
    complete: bool,
) -> usage.Usage:
    counter, model, endpoint = runtime.tokens, route.model, record.endpoint
    size = sum(len(str(v)) for v in body.values()) + len(text)
    prompt = await off_loop(size, lambda: counter.count_prompt(model, endpoint, body))
    completion = (
        None
        if endpoint == "embeddings"
        else await off_loop(len(text), lambda: counter.count_text(model, text))
    )
    record.estimated = True
    source = usage.Source.ESTIMATE if complete else usage.Source.PARTIAL
    return usage.Usage(prompt=prompt, completion=completion, source=source)


async def stream_usage(
    runtime: Runtime,
    record: Record,
    route: Route,
    body: dict[str, Any],
    watch: StreamWatch,
    *,
    complete: bool,
) -> usage.Usage:
    found = _watched_usage(watch, usage.Source.UPSTREAM if complete else usage.Source.PARTIAL)
    if found is not None:
        return found
    if record.endpoint == "other":
        return usage.NO_USAGE
    return await _estimate(runtime, record, route, body, watch.text(), complete=complete)


def _watched_usage(watch: StreamWatch, source: usage.Source) -> usage.Usage | None:
    """The last usage the stream carried (cumulative: never a sum), with its provenance."""
    if watch.last_usage is None:
        return None
    found = usage.from_body(usage.loads(watch.last_usage))
    return None if found is None else dataclasses.replace(found, source=source)


def client_left(
    runtime: Runtime,
    record: Record,
    route: Route | None,
    body: dict[str, Any] | None,
    watch: StreamWatch | None = None,
) -> None:
    """The client hung up: count what was done, synchronously (we are being cancelled)."""
    if record.status == STATUS_CLIENT_DISCONNECT:
        return
    record.status = STATUS_CLIENT_DISCONNECT
    record.waste_reason = Waste.CLIENT_DISCONNECT.value
    if route is None or body is None or not record.reached_upstream:
        return
    if watch is not None:
        record.first_token_ns = watch.first_token_ns
        found = _watched_usage(watch, usage.Source.PARTIAL)
        if found is not None:
            record.usage = found
            return
    if record.endpoint == "other":
        return
    counter = runtime.tokens
    text = watch.text() if watch is not None else ""
    try:
        prompt = counter.count_prompt(route.model, record.endpoint, body)
        completion = counter.count_text(route.model, text)
    except Exception:  # never let counting turn a disconnect into a crash
        log.exception("token estimate failed for request %s", record.request_id)
        return
    record.estimated = True
    record.usage = usage.Usage(prompt=prompt, completion=completion, source=usage.Source.PARTIAL)
