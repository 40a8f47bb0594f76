"""One request from top to bottom, and the single `finally` that settles it.

check the target -> authenticate -> read, parse, validate -> route -> admit -> forward ->
relay. Each step raises a ProxyError on failure; the `finally` in `handle` settles the
exchange exactly once, whatever happened. Foreign (aiohttp) exceptions become upstream
outcomes through one table, `_FAILURES`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import weakref
from contextvars import ContextVar
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import accounting, admission, auth, errors, intake
from .config import USAGE_STREAM_KINDS
from .endpoints import OTHER, Endpoint
from .errors import ProxyError
from .exchange import NO_LABEL, Exchange
from .proxy_headers import REQUEST_DROP
from .relay import ClientGone, client_headers, redact, relay_body, relay_stream
from .routing import Route
from .runtime import Runtime
from .usage import Source, loads
from .watch import StreamWatch

log = logging.getLogger(__name__)

# Request bodies larger than this are handed to aiohttp as a stream.
_LARGE_BODY = 1024 * 1024
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


# Failure kinds of a request whose connection never opened: no upstream saw a byte of it.
NOT_CONNECTED = frozenset({"connect", "connect_timeout"})


def _translate(exc: BaseException, route: Route) -> tuple[str, ProxyError]:
    timeouts = route.upstream.timeouts
    for exc_type, kind, error_type, template in _FAILURES:
        if isinstance(exc, exc_type):
            detail = template.format(connect=timeouts.connect_s, first_byte=timeouts.first_byte_s)
            return kind, error_type(f"upstream `{route.upstream.name}` {detail}")
    raise exc


def error_response(error: ProxyError, ex: Exchange) -> web.Response:
    response = web.Response(
        status=error.status,
        body=errors.render(error),
        content_type="application/json",
        headers={
            **error.headers,
            "x-request-id": ex.client_request_id or ex.key,
            "x-meterproxy-request-id": ex.key,
        },
    )
    return response


async def _answer_and_close(request: web.Request, response: web.Response) -> None:
    """A client too slow with its body gets its answer, then the connection closes: the rest
    of the body is not worth waiting for (aiohttp would read it for seconds more)."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        return
    if request.transport is not None:
        request.transport.close()


def refusal(runtime: Runtime, error: ProxyError) -> web.Response:
    """An error answered outside the metered path (model listing, status page, unknown URL)."""
    ex = Exchange(key=runtime.keys.new(), endpoint=OTHER, started_ns=runtime.clock())
    return error_response(error, ex)


async def handle(request: web.Request, runtime: Runtime, endpoint: Endpoint) -> web.StreamResponse:
    """Any /v1 request: the endpoint table says how it is read, metered and judged."""
    ex = Exchange(
        key=runtime.keys.new(),
        endpoint=endpoint,
        started_ns=runtime.clock(),
        client_request_id=intake.client_request_id(request.headers.get("x-request-id")),
        task_id=intake.task_id(request.headers.get(intake.TASK_HEADER)),
    )
    try:
        intake.check_target(request.raw_path)
        settings = runtime.settings
        ex.tenant = auth.authenticate(settings.tenancy, request.headers)
        if runtime.metering:
            runtime.settler.opened(ex)
        server = settings.server
        raw = await intake.read_body(request, server.max_body_bytes, server.timeouts.body_s)
        ex.body_bytes = len(raw)
        if endpoint.json_body:
            ex.body = intake.parse_json(raw)
            intake.read_facts(ex, ex.body)
            ex.route = await intake.route_for(runtime, ex.body)
        else:
            ex.body = intake.maybe_json(raw)
            ex.route = intake.route_other(runtime, ex.body)
        modified = False
        if ex.body is not None and ex.model != NO_LABEL:
            modified = await admission.admit(runtime, ex)
        return await _forward(request, runtime, ex, raw, modified)
    except ProxyError as error:
        ex.refuse(error)
        if isinstance(error, (errors.RateLimited, errors.QuotaExhausted, errors.QuotaUnavailable)):
            runtime.metrics.quota_rejections.labels(ex.tenant.name, error.limit).inc()
        response = error_response(error, ex)
        if isinstance(error, errors.RequestTimeout):
            await _answer_and_close(request, response)
        return response
    except asyncio.CancelledError:
        accounting.client_left(ex, None)
        raise
    finally:
        if runtime.metering:
            runtime.settler.settle(ex)


def upstream_headers(
    headers: CIMultiDictProxy[str], route: Route, ex: Exchange
) -> CIMultiDict[str]:
    # Headers the client names in `Connection` are hop-by-hop too (RFC 9110 7.6.1).
    connection = headers.get("connection")
    named = {t.strip().lower() for t in connection.split(",")} if connection else REQUEST_DROP
    out: CIMultiDict[str] = CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if (lower := name.lower()) not in REQUEST_DROP and lower not in named
    )
    if route.upstream.api_key:
        out["Authorization"] = f"Bearer {route.upstream.api_key}"
    out["x-request-id"] = ex.client_request_id or ex.key
    return out


def _ask_for_usage(ex: Exchange, runtime: Runtime) -> bool:
    """Streams: ask the upstream for exact usage when the client did not; the extra usage-only
    chunk is then left out of the relay. Returns whether the body was changed."""
    assert ex.route is not None and ex.body is not None
    if not (
        ex.stream
        and runtime.metering
        and ex.endpoint.asks_usage
        and ex.route.upstream.kind in USAGE_STREAM_KINDS
    ):
        return False
    options = ex.body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return False
    ex.body["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return True


async def _forward(
    request: web.Request, runtime: Runtime, ex: Exchange, raw: bytes, modified: bool
) -> web.StreamResponse:
    route = ex.route
    assert route is not None
    upstream = route.upstream
    state = runtime.live.upstreams[upstream.name]
    strip_usage = False
    if ex.body is not None and ex.endpoint.json_body:
        strip_usage = _ask_for_usage(ex, runtime)
        if modified or strip_usage or ex.body.get("model") != route.model:
            ex.body["model"] = route.model
            raw = orjson.dumps(ex.body)
    url = URL(upstream.url + request.raw_path[3:], encoded=True)
    headers = upstream_headers(request.headers, route, ex)
    inflight = runtime.metrics.inflight_for(upstream.name)
    inflight.inc()
    mark = state.occupancy.begin(runtime.clock())
    energy = runtime.energy
    energy.start(
        ex.key, upstream.name, (ex.model, upstream.name, ex.tenant.name), len(raw) // 4, ex.stream
    )
    response: aiohttp.ClientResponse | None = None
    watch: StreamWatch | None = None
    try:
        response = await _send(runtime, state.session, request.method, url, raw, headers, ex)
        state.last_answer_ns = runtime.clock()
        upstream_id = response.headers.get("x-request-id")
        ex.upstream_request_id = intake.client_request_id(upstream_id)
        _switch_to_idle_timeout(response, upstream.timeouts.idle_s)
        if response.status >= 400:
            return await _upstream_error(response, ex, route)
        if ex.stream and response.content_type == "text/event-stream":
            watch = StreamWatch(runtime.clock, ex.endpoint, strip_usage=strip_usage)
            return await relay_stream(request, response, runtime, ex, watch)
        return await relay_body(request, response, runtime, ex)
    except ClientGone:
        accounting.client_left(ex, watch)
        return web.Response(status=499, reason="Client Closed Request")  # never sent
    except asyncio.CancelledError:
        accounting.client_left(ex, watch)
        raise
    finally:
        inflight.dec()
        ex.gpu_seconds = state.occupancy.end(runtime.clock(), mark)
        usage = ex.usage
        if usage.known:  # the upstream's own counts correct the request's work
            energy.usage(ex.key, usage.prompt, usage.cached_prompt, usage.completion)
            if ex.prompt_text_bytes and usage.prompt and usage.source is Source.UPSTREAM:
                runtime.tokens.learn(ex.model, ex.prompt_text_bytes, usage.prompt)
        energy.end(ex.key)
        if response is not None:
            response.close()  # a no-op after a full read; otherwise the upstream sees a close


# Whether the current task's latest try went out on a pooled connection (set by the connector).
_REUSED: ContextVar[bool] = ContextVar("meterproxy_upstream_reused", default=False)


class UpstreamConnector(aiohttp.TCPConnector):
    """Every upstream session's connector: notes, for the try being sent, whether its
    connection came from the pool (a connection it has handed out before). A trace config
    could say the same, but aiohttp then sends every trace event of every request: ~25 µs a
    request. The note travels in a context variable: the connection is made in the task that
    sends the request, so `_send` reads what `connect` set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()  # protocols handed out

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        if protocol is not None:
            if protocol in self._seen:
                _REUSED.set(True)
            else:
                self._seen.add(protocol)
        return connection


# Tries of one request whose pooled connection the upstream had already closed.
_STALE_RETRIES = 2


async def _send(
    runtime: Runtime,
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    raw: bytes,
    headers: CIMultiDict[str],
    ex: Exchange,
) -> aiohttp.ClientResponse:
    """The request to the upstream. A pooled connection the upstream closed while it sat idle
    (some servers, llama.cpp's among them, close after every stream while announcing
    keep-alive) fails before any response byte: such a try is made again, on another
    connection, since no live server read it. A fresh connection's failure is final."""
    route = ex.route
    assert route is not None
    ex.reached_upstream = True
    for retry in range(_STALE_RETRIES + 1):
        _REUSED.set(False)
        try:
            return await session.request(
                method,
                url,
                # aiohttp warns (and may block) sending over 1 MiB of raw bytes at once
                data=raw if len(raw) <= _LARGE_BODY else io.BytesIO(raw),
                headers=headers,
                allow_redirects=False,
            )
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if _REUSED.get() and retry < _STALE_RETRIES:
                runtime.metrics.upstream_retries.labels(route.upstream.name).inc()
                continue
            failure: BaseException = exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            failure = exc
        kind, error = _translate(failure, route)
        ex.upstream_failed(kind, reached=kind not in NOT_CONNECTED)
        raise error from None
    raise AssertionError("unreachable")  # the loop returns or raises


def _switch_to_idle_timeout(response: aiohttp.ClientResponse, idle_s: float) -> None:
    """Headers are in: from now on sock_read bounds the silence between chunks."""
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is None or response.content.is_eof():
        return  # already complete: aiohttp has dropped the timer, and must not get a new one
    protocol.read_timeout = idle_s
    protocol.start_timeout()


async def _upstream_error(
    response: aiohttp.ClientResponse, ex: Exchange, route: Route
) -> web.Response:
    name = route.upstream.name
    try:
        payload = await response.content.read(_ERROR_BODY_LIMIT)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        payload = b""
    status = response.status
    if status in (401, 403):
        ex.upstream_failed("auth_rejected")
        log.error("upstream %s rejected the proxy's credentials (HTTP %d)", name, status)
        raise errors.UpstreamAuthRejected(
            f"upstream `{name}` rejected the proxy's own credentials (HTTP {status}); this is a "
            "proxy misconfiguration: check the key named by upstreams[].api_key_env"
        )
    if status >= 500:
        ex.upstream_failed(f"http_{status // 100}xx")
    payload = redact(payload, route.upstream)
    parsed = loads(payload) if payload else None
    # An API's own error answer passes as it is: JSON, or an error event (LiteLLM answers a
    # failed stream with its status and `data: {"error": ...}`). Anything else (a load
    # balancer's HTML page) is not an answer a client can read: a 502 of ours says so.
    if not isinstance(parsed, dict) and response.content_type != "text/event-stream":
        ex.upstream_failed(ex.upstream_error or "bad_response")
        raise errors.UpstreamBadResponse(
            f"upstream `{name}` answered HTTP {status} with a body that is not JSON "
            f"({response.content_type or 'no content type'}); see the upstream's logs"
        )
    ex.answered(status)
    return web.Response(
        status=status, body=payload, headers=client_headers(response.headers, ex, route.upstream)
    )
