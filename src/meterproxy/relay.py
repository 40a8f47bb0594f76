"""Step 6 of the request path: the upstream's bytes written to the client as they arrive, a copy
watched beside them, and the outcome noted on the exchange.

The client receives the upstream's bytes untouched, with two documented exceptions: the usage
chunk the proxy asked for is left out, and the proxy's own upstream credentials never leave it
(redacted wherever an upstream echoes them). An upstream reset is mirrored as a reset.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from . import accounting, errors
from .config import Upstream
from .exchange import Exchange, Outcome
from .proxy_headers import RESPONSE_DROP
from .runtime import Runtime
from .sse import Event, EventTooLarge, SSEScanner, whole_events
from .usage import loads
from .watch import StreamWatch, UsageCut

log = logging.getLogger(__name__)

# Non-streamed bodies up to this size are read whole and answered in one write.
_SMALL_BODY = 1024 * 1024
# Of a larger body, at most this much is kept to read its usage from.
_KEPT_BODY = 8 * 1024 * 1024
REDACTED = b"[redacted]"


class ClientGone(Exception):
    """The client's connection broke while the response was being written."""


def client_headers(
    headers: CIMultiDictProxy[str], ex: Exchange, upstream: Upstream
) -> CIMultiDict[str]:
    """The upstream's headers as the client may see them: hop-by-hop ones dropped, a redirect's
    `Location` made relative to the proxy (or dropped when it points elsewhere), the proxy's
    credentials redacted, the request ids set."""
    out: CIMultiDict[str] = CIMultiDict()
    secret = upstream.api_key
    for name, value in headers.items():
        lower = name.lower()
        if lower in RESPONSE_DROP or lower == "x-request-id":
            continue
        if lower in ("location", "content-location"):
            if value.startswith(upstream.url + "/"):
                value = "/v1" + value[len(upstream.url) :]  # the same place, through the proxy
            elif not (value.startswith("/v1/") and "//" not in value):
                continue  # the upstream's own address, or somewhere else: not for the client
        if secret and secret in value:
            value = value.replace(secret, REDACTED.decode())
        out.add(name, value)
    out["x-request-id"] = ex.upstream_request_id or ex.client_request_id or ex.key
    out["x-meterproxy-request-id"] = ex.key
    return out


def redact(data: bytes, upstream: Upstream) -> bytes:
    secret = upstream.api_key
    if secret and secret.encode() in data:
        return data.replace(secret.encode(), REDACTED)
    return data


async def _prepare(out: web.StreamResponse, request: web.Request) -> None:
    try:
        await out.prepare(request)
    except ConnectionResetError:
        raise ClientGone() from None


def _broken_kind(exc: BaseException, tripped: bool) -> str:
    if tripped or isinstance(exc, asyncio.TimeoutError):
        return "idle_timeout"
    return "reset"


async def relay_body(
    request: web.Request, response: aiohttp.ClientResponse, runtime: Runtime, ex: Exchange
) -> web.StreamResponse:
    assert ex.route is not None
    upstream = ex.route.upstream
    headers = client_headers(response.headers, ex, upstream)
    size = response.content_length
    if size is not None and size <= _SMALL_BODY:
        try:
            payload = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            ex.upstream_failed(_broken_kind(exc, False))
            raise errors.UpstreamBadResponse(
                f"upstream `{upstream.name}` broke off its response"
            ) from None
        ex.answered(response.status)
        payload = redact(payload, upstream)
        accounting.body_end(ex, loads(payload), complete=True)
        return web.Response(status=response.status, body=payload, headers=headers)
    out = web.StreamResponse(status=response.status, headers=headers)
    ex.answered(response.status)
    await _prepare(out, request)
    parts: list[bytes] = []
    kept = 0
    broken: str | None = None
    guard = runtime.watchdog.watch(upstream.timeouts.idle_s, response.close)
    try:
        async for chunk in response.content.iter_any():
            guard.last_ns = runtime.clock()
            if kept < _KEPT_BODY:
                parts.append(chunk)
                kept += len(chunk)
            await out.write(redact(chunk, upstream))
    except ConnectionResetError:
        accounting.client_left(ex, None)
        return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        broken = _broken_kind(exc, guard.tripped)
    finally:
        runtime.watchdog.forget(guard)
    if broken is not None:
        ex.broke(broken, waste=False)
        _abort(request)
    else:
        await _write_eof(out, ex)
    body = loads(b"".join(parts)) if kept <= _KEPT_BODY else None
    accounting.body_end(ex, body, complete=broken is None)
    return out


async def relay_stream(
    request: web.Request,
    response: aiohttp.ClientResponse,
    runtime: Runtime,
    ex: Exchange,
    watch: StreamWatch,
) -> web.StreamResponse:
    assert ex.route is not None
    upstream = ex.route.upstream
    out = web.StreamResponse(
        status=response.status, headers=client_headers(response.headers, ex, upstream)
    )
    ex.answered(response.status)
    await _prepare(out, request)
    if not runtime.metering:  # benchmark-only: the same relay with nothing watching it
        async for chunk in response.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out
    scanner = SSEScanner(max_event_bytes=runtime.settings.server.max_sse_event_bytes)
    cut = UsageCut()
    broken: str | None = None
    energy, key = runtime.energy, ex.key
    secret = upstream.api_key.encode() if upstream.api_key else None
    guard = runtime.watchdog.watch(upstream.timeouts.idle_s, response.close)
    _stop_read_timer(response)
    try:
        async for chunk in response.content.iter_any():
            guard.last_ns = runtime.clock()
            # Before the watch sees this chunk's events (a whole chunk is counted as it is
            # taken): what it adds goes to the energy attribution below.
            seen, had_first = watch.content_events, watch.first_token_ns is not None
            if secret is not None and secret in chunk:
                chunk = chunk.replace(secret, REDACTED)
            if not watch.strip_usage:
                # Nothing to leave out: relay first, then let the meter look at a copy.
                await out.write(chunk)
                taken = scanner.take_whole(chunk)
                events = scanner.feed(chunk) if taken is None else _events(watch, taken)
            elif (
                not cut.holding
                and b'"usage":null' not in chunk  # OpenAI's: a usage to cut from every event
                and (taken := scanner.take_whole(chunk, unless=_CUT_MARKS)) is not None
            ):
                # Whole events with nothing to leave out (the most of a stream) are relayed as
                # they are; an event not yet whole waits for the rest of it; from an event with
                # something to leave out on, they go one by one.
                if taken[0]:
                    await out.write(taken[0])
                events = _events(watch, taken)
                if taken[2]:
                    events += await _cut_and_write(out, cut, scanner.feed(b""))
            else:
                # Whole events only, so that the usage the proxy asked for can be left out.
                events = await _cut_and_write(out, cut, scanner.feed(chunk))
            for event in events:
                watch.on_event(event)
            if watch.ended:
                ex.finished()
            if not had_first and watch.first_token_ns is not None:
                energy.first_token(key, watch.first_token_ns)
            energy.decoded(key, watch.content_events - seen)
        else:
            seen, had_first = watch.content_events, watch.first_token_ns is not None
            for event in scanner.flush():
                watch.on_event(event)
                for kept_raw in cut.feed(event) if watch.strip_usage else [event.raw]:
                    await out.write(kept_raw)
            for kept_raw in cut.flush():
                await out.write(kept_raw)
            if not had_first and watch.first_token_ns is not None:
                energy.first_token(key, watch.first_token_ns)
            energy.decoded(key, watch.content_events - seen)
    except ConnectionResetError:
        accounting.client_left(ex, watch)
        return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        broken = _broken_kind(exc, guard.tripped)
    except EventTooLarge:
        broken = "oversized_event"
    finally:
        runtime.watchdog.forget(guard)
    reset = broken is not None
    if broken is None and watch.error:
        broken = "in_band_error"
    elif (
        broken is None
        and not watch.ended
        and (ex.endpoint.ends_with_done or ex.endpoint.judged_by_events)
    ):
        broken = "eof_without_done"
    if broken is not None:
        ex.broke(broken)
        log.warning("upstream %s broke off stream %s (%s)", upstream.name, ex.key, broken)
    elif watch.truncated:
        ex.truncated()
    accounting.stream_end(ex, watch)
    if reset:
        _abort(request)  # mirror the reset: the client must not see a clean end
    else:
        await _write_eof(out, ex)
    return out


# What may be cut from an event (SSEScanner.take_whole leaves events holding these to `feed`).
_CUT_MARKS = (b'"usage"', b'"finish_reason":"')


def _events(watch: StreamWatch, taken: tuple[bytes, int, bool]) -> list[Event]:
    """Whole events taken at once: the watch notes them in one step when it can, else they
    are made into events for it."""
    done, count, _ = taken
    if not count or watch.on_whole_events(done, count):
        return []
    return whole_events(done)


async def _cut_and_write(
    out: web.StreamResponse, cut: UsageCut, events: list[Event]
) -> list[Event]:
    """Relay whole events less what the proxy must leave out (usage it asked for)."""
    kept = [b for e in events for b in cut.feed(e)]
    if kept:
        await out.write(kept[0] if len(kept) == 1 else b"".join(kept))
    return events


def _stop_read_timer(response: aiohttp.ClientResponse) -> None:
    """The watchdog bounds this stream's silences from here on (within its 0.25 s period), so
    aiohttp's own read timer goes: it is cancelled and made anew at every read, a cost paid
    for every chunk of every stream."""
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is not None:
        protocol.read_timeout = None
        protocol.start_timeout()  # cancels the timer armed for the idle limit


async def _write_eof(out: web.StreamResponse, ex: Exchange) -> None:
    try:
        await out.write_eof()
    except ConnectionResetError:
        if not ex.final_relayed:
            accounting.client_left(ex, None)
        return
    if ex.outcome is Outcome.SUCCESS:
        ex.finished()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
