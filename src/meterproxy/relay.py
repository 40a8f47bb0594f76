"""Steps 6 and 7 of the request path: the upstream's bytes written to the client as they
arrive, a copy watched beside them, and the outcome noted for settlement."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from . import errors
from .accounting import client_left, settle_body, stream_usage
from .meter import STATUS_STREAM_BROKEN, USAGE_ONLY, Record, StreamWatch, Waste
from .proxy_headers import RESPONSE_DROP
from .routing import Route
from .runtime import Runtime
from .sse import SSEScanner
from .usage import loads

log = logging.getLogger(__name__)

# Streamed endpoints whose stream must end with `data: [DONE]`.
DONE_ENDPOINTS = frozenset({"chat_completions", "completions"})


# Non-streamed bodies up to this size are read whole and answered in one write.
_SMALL_BODY = 1024 * 1024


class _StreamBroken(Exception):
    """The upstream broke off mid-body; `kind` is its row in the failure table."""

    def __init__(self, kind: str, reset: bool) -> None:
        self.kind = kind
        self.reset = reset


def _broken_kind(exc: BaseException) -> str:
    return "idle_timeout" if isinstance(exc, asyncio.TimeoutError) else "reset"


def client_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in RESPONSE_DROP:
            out.add(name, value)
    out["x-request-id"] = request_id
    return out


async def relay_body(
    request: web.Request,
    response: aiohttp.ClientResponse,
    runtime: Runtime,
    record: Record,
    route: Route,
    body: dict[str, Any],
) -> web.StreamResponse:
    headers = client_headers(response.headers, record.request_id)
    size = response.content_length
    if size is not None and size <= _SMALL_BODY:
        try:
            payload = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            record.upstream_error = _broken_kind(exc)
            raise errors.UpstreamBadResponse(
                f"upstream `{route.upstream.name}` broke off its response"
            ) from None
        await settle_body(runtime, record, route, body, loads(payload), complete=True)
        _energy_usage(runtime, record)
        return web.Response(status=response.status, body=payload, headers=headers)
    out = web.StreamResponse(status=response.status, headers=headers)
    await out.prepare(request)
    parts: list[bytes] = []
    broken: _StreamBroken | None = None
    try:
        async for chunk in response.content.iter_any():
            parts.append(chunk)
            await out.write(chunk)
    except ConnectionResetError:
        client_left(runtime, record, route, body, None)
        return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        broken = _StreamBroken(_broken_kind(exc), True)
    if broken is not None:
        record.upstream_error, record.status = broken.kind, STATUS_STREAM_BROKEN
        _abort(request)
    else:
        await out.write_eof()
    await settle_body(runtime, record, route, body, loads(b"".join(parts)), complete=broken is None)
    _energy_usage(runtime, record)
    return out


async def relay_stream(
    request: web.Request,
    response: aiohttp.ClientResponse,
    runtime: Runtime,
    record: Record,
    route: Route,
    body: dict[str, Any],
    watch: StreamWatch,
) -> web.StreamResponse:
    out = web.StreamResponse(
        status=response.status, headers=client_headers(response.headers, record.request_id)
    )
    await out.prepare(request)
    if not runtime.metering:  # benchmark-only: the same relay with nothing watching it
        async for chunk in response.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out
    scanner = SSEScanner()
    broken: _StreamBroken | None = None
    energy = runtime.energy
    try:
        async for chunk in response.content.iter_any():
            if not watch.strip_usage or (
                not scanner.pending
                and chunk.endswith(b"\n\n")
                and not (b'"usage"' in chunk and USAGE_ONLY.search(chunk))
            ):
                # Nothing to leave out: relay first, then let the meter look at a copy.
                await out.write(chunk)
                events = scanner.feed(chunk)
            else:
                # Whole events only, so the usage chunk the proxy asked for can be left out.
                events = scanner.feed(chunk)
                kept = [e.raw for e in events if not watch.is_proxy_usage_chunk(e)]
                if kept:
                    await out.write(kept[0] if len(kept) == 1 else b"".join(kept))
            seen, had_first = watch.content_events, watch.first_token_ns is not None
            for event in events:
                watch.on_event(event)
            if energy is not None:
                if not had_first and watch.first_token_ns is not None:
                    energy.first_token(record.request_id, watch.first_token_ns)
                energy.decoded(record.request_id, watch.content_events - seen)
        for event in scanner.flush():
            watch.on_event(event)
            await out.write(event.raw)
    except ConnectionResetError:
        client_left(runtime, record, route, body, watch)
        return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        broken = _StreamBroken(_broken_kind(exc), True)
    if broken is None and watch.error:
        broken = _StreamBroken("in_band_error", False)
    elif (
        broken is None
        and not (watch.done or watch.terminal)
        and (record.endpoint in DONE_ENDPOINTS or record.endpoint == "responses")
    ):
        broken = _StreamBroken("eof_without_done", False)
    if broken is not None:
        record.upstream_error, record.status = broken.kind, STATUS_STREAM_BROKEN
        record.waste_reason = Waste.UPSTREAM_ERROR.value
        log.warning(
            "upstream %s broke off stream %s (%s)",
            route.upstream.name,
            record.request_id,
            broken.kind,
        )
    elif watch.truncated:
        record.waste_reason = Waste.TRUNCATED.value
    record.first_token_ns = watch.first_token_ns
    record.usage = await stream_usage(runtime, record, route, body, watch, complete=broken is None)
    _energy_usage(runtime, record)
    if broken is not None and broken.reset:
        _abort(request)  # mirror the reset: the client must not see a clean end
    else:
        await out.write_eof()
    return out


def _energy_usage(runtime: Runtime, record: Record) -> None:
    """The upstream's counts correct the request's GPU work before its energy is final."""
    usage = record.usage
    if runtime.energy is not None and usage.known:
        runtime.energy.usage(record.request_id, usage.prompt, usage.cached_prompt, usage.completion)


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
