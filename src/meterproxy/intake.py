"""Steps 1 and 3 of the request path: the body read within its limit, parsed, and routed to an
upstream by its `model`."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from . import discovery, errors
from .meter import NO_LABEL
from .routing import Route
from .runtime import Runtime
from .usage import loads


async def read_body(request: web.Request, runtime: Runtime) -> bytes:
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


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.MalformedJSON(f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise errors.MalformedJSON("request body must be a JSON object")
    return body


def maybe_json(raw: bytes) -> dict[str, Any] | None:
    body = loads(raw) if raw else None
    return body if isinstance(body, dict) else None


def route_other(runtime: Runtime, body: dict[str, Any] | None) -> Route:
    model = body.get("model") if body is not None else None
    route = runtime.router.resolve(model) if isinstance(model, str) else None
    return route or Route(runtime.router.default_upstream, NO_LABEL)


async def route_for(runtime: Runtime, body: dict[str, Any]) -> Route:
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
