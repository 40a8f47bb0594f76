"""Upstream I/O for one request, and the single `finally` that settles it.

serve(): read body -> parse -> route -> forward -> relay, each step raising a ProxyError on
failure; the `finally` in `serve` settles the request exactly once, whatever happened.
Foreign (aiohttp) exceptions become upstream outcomes through one table, `_FAILURES`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import admission, auth, discovery, errors, usage
from .config import USAGE_STREAM_KINDS
from .errors import ProxyError
from .meter import (
    NO_LABEL,
    STATUS_CLIENT_DISCONNECT,
    STATUS_STREAM_BROKEN,
    BodyCopy,
    Record,
    StreamWatch,
    Waste,
    text_of,
)
from .routing import Route
from .runtime import Runtime
from .sse import SSEScanner
from .tokens import off_loop

log = logging.getLogger(__name__)

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus those the
# proxy owns: the client's proxy key never travels upstream, lengths are recomputed.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_REQUEST_DROP = _HOP_BY_HOP | {"authorization", "api-key", "accept-encoding", "expect"}
_RESPONSE_DROP = _HOP_BY_HOP | {"content-encoding"}
# Streamed endpoints whose stream must end with `data: [DONE]`.
_DONE_ENDPOINTS = frozenset({"chat_completions", "completions"})
# Upstream error bodies are read whole to inspect them; past this they are cut.
_ERROR_BODY_LIMIT = 1024 * 1024
# Non-streamed bodies up to this size are read whole and answered in one write.
_SMALL_BODY = 1024 * 1024


class _StreamBroken(Exception):
    """The upstream broke off mid-body; `kind` is its row in the failure table."""

    def __init__(self, kind: str, reset: bool) -> None:
        self.kind = kind
        self.reset = reset


# aiohttp exception -> (upstream error kind, proxy error) while waiting for the response.
# Order matters: timeouts subclass connection errors.
_FAILURES: tuple[tuple[type[BaseException], str, type[ProxyError], str], ...] = (
    (
        aiohttp.ConnectionTimeoutError,
        "connect_timeout",
        errors.UpstreamTimeout,
        "did not accept a connection within {connect}s (upstreams[].timeouts.connect)",
    ),
    (
        aiohttp.ServerTimeoutError,
        "first_byte_timeout",
        errors.UpstreamTimeout,
        "sent no response within {first_byte}s (upstreams[].timeouts.first_byte)",
    ),
    (
        asyncio.TimeoutError,
        "first_byte_timeout",
        errors.UpstreamTimeout,
        "sent no response within {first_byte}s (upstreams[].timeouts.first_byte)",
    ),
    (
        aiohttp.ClientConnectorError,
        "connect",
        errors.UpstreamUnreachable,
        "is unreachable (connection refused or no route); is it running?",
    ),
    (
        aiohttp.ServerDisconnectedError,
        "reset",
        errors.UpstreamBadResponse,
        "closed the connection without answering",
    ),
    (
        aiohttp.ClientResponseError,
        "bad_response",
        errors.UpstreamBadResponse,
        "sent a response that is not valid HTTP",
    ),
    (
        aiohttp.ClientError,
        "reset",
        errors.UpstreamUnreachable,
        "failed while the request was being sent",
    ),
)


def _translate(exc: BaseException, route: Route) -> tuple[str, ProxyError]:
    timeouts = route.upstream.timeouts
    for exc_type, kind, error_type, template in _FAILURES:
        if isinstance(exc, exc_type):
            detail = template.format(connect=timeouts.connect_s, first_byte=timeouts.first_byte_s)
            return kind, error_type(f"upstream `{route.upstream.name}` {detail}")
    raise exc


def _broken_kind(exc: BaseException) -> str:
    return "idle_timeout" if isinstance(exc, asyncio.TimeoutError) else "reset"


def error_response(error: ProxyError, request_id: str) -> web.Response:
    return web.Response(
        status=error.status,
        body=errors.render(error),
        content_type="application/json",
        headers={**error.headers, "x-request-id": request_id},
    )


async def serve(request: web.Request, runtime: Runtime, endpoint: str) -> web.StreamResponse:
    """An OpenAI endpoint whose body names its model (chat, completions, embeddings, ...)."""
    return await _serve(request, runtime, endpoint)


async def serve_other(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    """Any other /v1/* path: to the upstream of the body's model, else the first upstream."""
    return await _serve(request, runtime, "other")


async def _serve(request: web.Request, runtime: Runtime, endpoint: str) -> web.StreamResponse:
    client_id = request.headers.get("x-request-id")
    record = Record(
        request_id=client_id or runtime.new_request_id(),
        endpoint=endpoint,
        started_ns=runtime.clock(),
        client_request_id=client_id,
    )
    try:
        tenant = auth.authenticate(runtime.settings.tenancy, request.headers)
        record.tenant = tenant.name
        raw = await _read_body(request, runtime)
        modified = False
        if endpoint == "other":
            body = _maybe_json(raw)
            route = _route_other(runtime, body)
            if route.model != NO_LABEL and body is not None:
                record.ticket, modified = await admission.admit(
                    runtime, tenant, route, body, endpoint
                )
        else:
            body = _parse_json(raw)
            route = await _route(runtime, body)
            record.ticket, modified = await admission.admit(runtime, tenant, route, body, endpoint)
        record.model, record.upstream = route.model, route.upstream.name
        return await _forward(request, runtime, record, route, body, raw, modified)
    except ProxyError as error:
        record.status = str(error.status)
        if isinstance(error, (errors.RateLimited, errors.QuotaExhausted)):
            runtime.metrics.quota_rejections.labels(record.tenant, error.limit).inc()
        return error_response(error, record.request_id)
    except asyncio.CancelledError:
        _client_left(runtime, record, None, None)
        raise
    finally:
        runtime.meter.settle(record)


async def _read_body(request: web.Request, runtime: Runtime) -> bytes:
    limit = runtime.settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(_too_large(request.content_length, limit))
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.PayloadTooLarge(_too_large(None, limit)) from None


def _too_large(size: int | None, limit: int) -> str:
    got = f"{size:,} bytes" if size is not None else "larger than the limit"
    return (
        f"request body is {got}; this proxy accepts at most {limit:,} bytes (server.max_body_bytes)"
    )


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.MalformedJSON(f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise errors.MalformedJSON("request body must be a JSON object")
    return body


def _maybe_json(raw: bytes) -> dict[str, Any] | None:
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _route_other(runtime: Runtime, body: dict[str, Any] | None) -> Route:
    model = body.get("model") if body is not None else None
    route = runtime.router.resolve(model) if isinstance(model, str) else None
    return route or Route(runtime.router.default_upstream, NO_LABEL)


async def _route(runtime: Runtime, body: dict[str, Any]) -> Route:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise errors.ModelNotFound("you must provide a model parameter", param="model")
    route = runtime.router.resolve(model)
    if route is None and await discovery.refresh_on_demand(runtime):
        route = runtime.router.resolve(model)
    if route is None:
        known = ", ".join(obj["id"] for obj in runtime.router.listing[:10]) or "none"
        raise errors.ModelNotFound(
            f"the model `{model[:200]}` does not exist or is not served here; "
            f"GET /v1/models lists what is (e.g. {known})",
            param="model",
        )
    return route


def upstream_headers(
    headers: CIMultiDictProxy[str], route: Route, request_id: str
) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    connection = headers.get("connection", "").lower()
    for name, value in headers.items():
        lower = name.lower()
        if lower in _REQUEST_DROP or (connection and lower in connection):
            continue
        out.add(name, value)
    if route.upstream.api_key:
        out["Authorization"] = f"Bearer {route.upstream.api_key}"
    out["x-request-id"] = request_id
    return out


def _client_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in _RESPONSE_DROP:
            out.add(name, value)
    out["x-request-id"] = request_id
    return out


async def _forward(
    request: web.Request,
    runtime: Runtime,
    record: Record,
    route: Route,
    body: dict[str, Any] | None,
    raw: bytes,
    modified: bool,
) -> web.StreamResponse:
    upstream = route.upstream
    if body is None:
        body = {}
        stream = rewrite = False
    else:
        stream = body.get("stream") is True
        user = body.get("user")
        record.client_user = user if isinstance(user, str) else None
        rewrite = modified or (route.model != NO_LABEL and body.get("model") != route.model)
    record.streamed = stream
    strip_usage = False
    if stream and record.endpoint in _DONE_ENDPOINTS and upstream.kind in USAGE_STREAM_KINDS:
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            # Ask for exact usage; the extra usage-only chunk is removed from the relay.
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            strip_usage = rewrite = True
    if rewrite:
        body["model"] = route.model
        raw = orjson.dumps(body)
    url = URL(upstream.url + request.raw_path[3:], encoded=True)
    headers = upstream_headers(request.headers, route, record.request_id)
    session = runtime.sessions[upstream.name]
    inflight = runtime.metrics.inflight.labels(upstream.name)
    inflight.inc()
    occupancy = runtime.occupancy[upstream.name]
    mark = occupancy.begin(runtime.clock())
    response: aiohttp.ClientResponse | None = None
    watch: StreamWatch | None = None
    try:
        try:
            record.reached_upstream = True
            response = await session.request(
                request.method, url, data=raw, headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            record.upstream_error, error = _translate(exc, route)
            record.reached_upstream = not isinstance(error, errors.UpstreamUnreachable)
            raise error from None
        runtime.last_answer_ns[upstream.name] = runtime.clock()
        _switch_to_idle_timeout(response, upstream.timeouts.idle_s)
        if response.status >= 400:
            return await _upstream_error(response, runtime, record, route)
        record.status = str(response.status)
        if stream and response.content_type == "text/event-stream":
            watch = StreamWatch(runtime.clock, strip_usage=strip_usage)
            return await _relay_stream(request, response, runtime, record, route, body, watch)
        return await _relay_body(request, response, runtime, record, route, body)
    except asyncio.CancelledError:
        _client_left(runtime, record, route, body, watch)
        raise
    finally:
        inflight.dec()
        record.gpu_seconds = occupancy.end(runtime.clock(), mark)
        if response is not None:
            response.close()  # a no-op after a full read; otherwise the upstream sees a close


def _switch_to_idle_timeout(response: aiohttp.ClientResponse, idle_s: float) -> None:
    """Headers are in: from now on sock_read bounds the silence between chunks."""
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is None or response.content.is_eof():
        return  # already complete: aiohttp has dropped the timer, and must not get a new one
    protocol.read_timeout = idle_s
    protocol.start_timeout()


async def _upstream_error(
    response: aiohttp.ClientResponse, runtime: Runtime, record: Record, route: Route
) -> web.Response:
    name = route.upstream.name
    try:
        payload = await response.content.read(_ERROR_BODY_LIMIT)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        payload = b""
    status = response.status
    if status in (401, 403):
        record.upstream_error = "auth_rejected"
        log.error("upstream %s rejected the proxy's credentials (HTTP %d)", name, status)
        raise errors.UpstreamAuthRejected(
            f"upstream `{name}` rejected the proxy's own credentials (HTTP {status}); this is a "
            "proxy misconfiguration: check the key named by upstreams[].api_key_env"
        )
    if status >= 500:
        record.upstream_error = f"http_{status // 100}xx"
    try:
        parsed = orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        record.upstream_error = record.upstream_error or "bad_response"
        raise errors.UpstreamBadResponse(
            f"upstream `{name}` answered HTTP {status} with a body that is not JSON "
            f"({response.content_type or 'no content type'}); see the upstream's logs"
        )
    record.status = str(status)
    return web.Response(
        status=status, body=payload, headers=_client_headers(response.headers, record.request_id)
    )


async def _relay_body(
    request: web.Request,
    response: aiohttp.ClientResponse,
    runtime: Runtime,
    record: Record,
    route: Route,
    body: dict[str, Any],
) -> web.StreamResponse:
    headers = _client_headers(response.headers, record.request_id)
    size = response.content_length
    if size is not None and size <= _SMALL_BODY:
        try:
            payload = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            record.upstream_error = _broken_kind(exc)
            raise errors.UpstreamBadResponse(
                f"upstream `{route.upstream.name}` broke off its response"
            ) from None
        await _settle_body(runtime, record, route, body, orjson_loads(payload), complete=True)
        return web.Response(status=response.status, body=payload, headers=headers)
    out = web.StreamResponse(status=response.status, headers=headers)
    await out.prepare(request)
    copy = BodyCopy()
    broken: _StreamBroken | None = None
    try:
        async for chunk in response.content.iter_any():
            copy.parts.append(chunk)
            await out.write(chunk)
    except ConnectionResetError:
        _client_left(runtime, record, route, body, None)
        return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        broken = _StreamBroken(_broken_kind(exc), True)
    if broken is not None:
        record.upstream_error, record.status = broken.kind, STATUS_STREAM_BROKEN
        _abort(request)
    else:
        await out.write_eof()
    await _settle_body(runtime, record, route, body, copy.parsed(), complete=broken is None)
    return out


def orjson_loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


async def _settle_body(
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


async def _relay_stream(
    request: web.Request,
    response: aiohttp.ClientResponse,
    runtime: Runtime,
    record: Record,
    route: Route,
    body: dict[str, Any],
    watch: StreamWatch,
) -> web.StreamResponse:
    out = web.StreamResponse(
        status=response.status, headers=_client_headers(response.headers, record.request_id)
    )
    await out.prepare(request)
    scanner = SSEScanner()
    broken: _StreamBroken | None = None
    try:
        async for chunk in response.content.iter_any():
            had_pending = scanner.pending
            events = scanner.feed(chunk)
            if not watch.strip_usage:
                for event in events:
                    watch.on_event(event)
                await out.write(chunk)
                continue
            # Only whole events are relayed here, so the proxy's usage chunk can be left out.
            kept = [event.raw for event in events if watch.on_event(event)]
            if not had_pending and not scanner.pending and len(kept) == len(events):
                await out.write(chunk)
            elif kept:
                await out.write(b"".join(kept))
        for event in scanner.flush():
            watch.on_event(event)
            await out.write(event.raw)
    except ConnectionResetError:
        _client_left(runtime, record, route, body, watch)
        return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        broken = _StreamBroken(_broken_kind(exc), True)
    if broken is None and watch.error:
        broken = _StreamBroken("in_band_error", False)
    elif (
        broken is None
        and not (watch.done or watch.terminal)
        and (record.endpoint in _DONE_ENDPOINTS or record.endpoint == "responses")
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
    record.usage = await _stream_usage(runtime, record, route, body, watch, complete=broken is None)
    if broken is not None and broken.reset:
        _abort(request)  # mirror the reset: the client must not see a clean end
    else:
        await out.write_eof()
    return out


async def _stream_usage(
    runtime: Runtime,
    record: Record,
    route: Route,
    body: dict[str, Any],
    watch: StreamWatch,
    *,
    complete: bool,
) -> usage.Usage:
    source = usage.Source.UPSTREAM if complete else usage.Source.PARTIAL
    if watch.last_usage is not None:
        found = usage.from_body(orjson_loads(watch.last_usage))
        if found is not None:
            return usage.Usage(
                found.prompt, found.completion, found.cached_prompt, found.reasoning, source
            )
    if record.endpoint == "other":
        return usage.NO_USAGE
    return await _estimate(runtime, record, route, body, watch.text(), complete=complete)


def _client_left(
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
        if watch.last_usage is not None:
            found = usage.from_body(orjson_loads(watch.last_usage))
            if found is not None:
                record.usage = usage.Usage(
                    found.prompt,
                    found.completion,
                    found.cached_prompt,
                    found.reasoning,
                    usage.Source.PARTIAL,
                )
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


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
