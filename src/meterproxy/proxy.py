"""One request from top to bottom, and the single `finally` that settles it.

authenticate -> read and parse -> route -> admit -> forward -> relay; each step raises a
ProxyError on failure, and the `finally` in `_serve` settles the request exactly once, whatever
happened. Foreign (aiohttp) exceptions become upstream outcomes through one table, `_FAILURES`.
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

from . import admission, auth, errors, intake
from .accounting import client_left
from .config import USAGE_STREAM_KINDS
from .errors import ProxyError
from .meter import NO_LABEL, Record, StreamWatch
from .proxy_headers import REQUEST_DROP
from .relay import DONE_ENDPOINTS, client_headers, relay_body, relay_stream
from .routing import Route
from .runtime import Runtime
from .usage import loads

log = logging.getLogger(__name__)

# Upstream error bodies are read whole to inspect them; past this they are cut.
_ERROR_BODY_LIMIT = 1024 * 1024


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
        raw = await intake.read_body(request, runtime)
        modified = False
        if endpoint == "other":
            body = intake.maybe_json(raw)
            route = intake.route_other(runtime, body)
        else:
            body = intake.parse_json(raw)
            route = await intake.route_for(runtime, body)
        record.model, record.upstream = route.model, route.upstream.name
        if body is not None and route.model != NO_LABEL:
            record.ticket, modified = await admission.admit(runtime, tenant, route, body, endpoint)
        return await _forward(request, runtime, record, route, body, raw, modified)
    except ProxyError as error:
        record.status = str(error.status)
        if isinstance(error, (errors.RateLimited, errors.QuotaExhausted)):
            runtime.metrics.quota_rejections.labels(record.tenant, error.limit).inc()
        return error_response(error, record.request_id)
    except asyncio.CancelledError:
        client_left(runtime, record, None, None)
        raise
    finally:
        if runtime.metering:
            runtime.meter.settle(record)


def upstream_headers(
    headers: CIMultiDictProxy[str], route: Route, request_id: str
) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    # Headers the client names in `Connection` are hop-by-hop too (RFC 9110 7.6.1).
    named = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    for name, value in headers.items():
        lower = name.lower()
        if lower in REQUEST_DROP or lower in named:
            continue
        out.add(name, value)
    if route.upstream.api_key:
        out["Authorization"] = f"Bearer {route.upstream.api_key}"
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
    if (
        stream
        and runtime.metering
        and record.endpoint in DONE_ENDPOINTS
        and upstream.kind in USAGE_STREAM_KINDS
    ):
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
    inflight = runtime.metrics.inflight_for(upstream.name)
    inflight.inc()
    occupancy = runtime.occupancy[upstream.name]
    mark = occupancy.begin(runtime.clock())
    energy = runtime.energy
    if energy is not None:  # prompt size for prefill work: bytes / 4, corrected by usage
        group = (record.model, record.upstream, record.tenant)
        energy.start(record.request_id, record.upstream, group, len(raw) // 4, stream)
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
            return await relay_stream(request, response, runtime, record, route, body, watch)
        return await relay_body(request, response, runtime, record, route, body)
    except asyncio.CancelledError:
        client_left(runtime, record, route, body, watch)
        raise
    finally:
        inflight.dec()
        record.gpu_seconds = occupancy.end(runtime.clock(), mark)
        if energy is not None:
            energy.end(record.request_id)
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
    parsed = loads(payload) if payload else None
    if not isinstance(parsed, dict):
        record.upstream_error = record.upstream_error or "bad_response"
        raise errors.UpstreamBadResponse(
            f"upstream `{name}` answered HTTP {status} with a body that is not JSON "
            f"({response.content_type or 'no content type'}); see the upstream's logs"
        )
    record.status = str(status)
    return web.Response(
        status=status, body=payload, headers=client_headers(response.headers, record.request_id)
    )
