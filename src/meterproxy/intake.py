"""Steps 1 and 3 of the request path: the target checked, the body read within its limits,
parsed and validated as OpenAI validates it, and routed to an upstream by its `model`.

Everything a client sends that is kept (request id, `user`) is bounded and cleaned here, once.
"""

from __future__ import annotations

import asyncio
import unicodedata
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from . import discovery, errors
from .endpoints import Endpoint
from .exchange import NO_LABEL, Exchange
from .routing import Route
from .runtime import Runtime

# JSON nested deeper than this is refused (OpenAI's own bodies nest a few levels; tool schemas a
# few dozen). It also keeps every recursive walk on the path (counting, re-encoding) far from
# Python's and orjson's recursion limits.
MAX_JSON_DEPTH = 64
# Values kept from a client (request id, `user`): at most this many characters.
MAX_REQUEST_ID_CHARS = 128
MAX_USER_CHARS = 256
MAX_TASK_ID_CHARS = 128
# Groups the calls of one task (an agent run, a ticket); outcomes are reported per task.
TASK_HEADER = "x-meterproxy-task"
# Output caps and answer counts beyond these are not requests, they are attacks on arithmetic.
MAX_TOKENS_VALUE = 2**31 - 1
MAX_CHOICES = 128


def check_target(raw_path: str) -> None:
    """Refuse what could reach another path upstream than the one metered here: absolute-form
    targets, encoded slashes or backslashes, dot segments (plain or percent-encoded), `//`."""
    if not raw_path.startswith("/"):
        raise errors.InvalidPath(
            "the request target must be a path (origin-form, e.g. /v1/chat/completions), "
            "not an absolute URL"
        )
    path = raw_path.split("?", 1)[0]
    lowered = path.lower()
    if (
        "%2f" in lowered
        or "%5c" in lowered
        or "\\" in path
        or "//" in path
        or ";" in path
        or (path.endswith("/") and path != "/")
    ):
        raise errors.InvalidPath(
            "the request path contains an encoded slash, a backslash, a `;` or an empty "
            "segment; send the plain path, e.g. /v1/chat/completions"
        )
    if ("%" in path or "/." in path) and any(  # no dot segment can hide without either
        segment in (".", "..") for segment in unquote(path).split("/")
    ):
        raise errors.InvalidPath("the request path contains `.` or `..` segments")


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(_too_large(request.content_length, limit))
    try:
        if request.content.is_eof():  # all here already (most bodies): no timer to arm
            return await request.read()
        return await asyncio.wait_for(request.read(), timeout_s)
    except web.HTTPRequestEntityTooLarge:
        raise errors.PayloadTooLarge(_too_large(None, limit)) from None
    except asyncio.TimeoutError:
        raise errors.RequestTimeout(
            f"the request body did not arrive within {timeout_s:g}s (server.timeouts.body_s)"
        ) from None


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
    _check_depth(body, raw)
    return body


def maybe_json(raw: bytes) -> dict[str, Any] | None:
    """The body of an `other` request if it is a JSON object (to route by its model)."""
    if not raw or raw[:1] not in (b"{", b" ", b"\n", b"\t", b"\r"):
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    _check_depth(body, raw)
    return body


def _check_depth(body: Any, raw: bytes | None = None) -> None:
    """Iteratively: a recursive check would be the overflow it guards against. JSON cannot nest
    deeper than it has brackets: a body with fewer (most) needs no walk."""
    if raw is not None and raw.count(b"{") + raw.count(b"[") <= MAX_JSON_DEPTH:
        return
    level: list[Any] = [body]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise errors.MalformedJSON(
                f"request body nests JSON more than {MAX_JSON_DEPTH} levels deep"
            )
        nxt: list[Any] = []
        for value in level:
            children = value.values() if isinstance(value, dict) else value
            nxt.extend(c for c in children if isinstance(c, (dict, list)))
        level = nxt


def read_facts(ex: Exchange, body: dict[str, Any]) -> None:
    """Validate the fields that decide how the request is metered, as OpenAI types them; a
    wrong type is a 400 naming the `param`, never a silent default."""
    endpoint = ex.endpoint
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean", stream)
    ex.stream = stream is True and endpoint.streams
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object", options)
        include = options.get("include_usage")
        if include is not None and not isinstance(include, bool):
            raise _invalid_type("stream_options.include_usage", "a boolean", include)
    choices = 1
    for name in endpoint.choice_fields:
        value = _integer(body, name, 1, MAX_CHOICES)
        if value is not None:
            choices = max(choices, value)
    ex.choices = choices
    for name in endpoint.max_token_fields:
        _integer(body, name, 0, MAX_TOKENS_VALUE)
    user = body.get("user")
    ex.client_user = clean_text(user, MAX_USER_CHARS) if isinstance(user, str) else None


def output_cap(endpoint: Endpoint, body: dict[str, Any]) -> tuple[str | None, int | None]:
    """The output cap the client set (its field, its value), preferred field first."""
    for name in endpoint.max_token_fields:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None, None


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(name, "an integer", value)
    if not low <= value <= high:
        raise errors.InvalidValue(
            f"invalid value for `{name}`: expected an integer from {low} to {high:,}, got {value}",
            param=name,
        )
    return value


def _invalid_type(name: str, expected: str, value: Any) -> errors.InvalidType:
    got = type(value).__name__ if not isinstance(value, str) else "a string"
    return errors.InvalidType(
        f"invalid type for `{name}`: expected {expected}, but got {got} instead", param=name
    )


def clean_text(value: str, limit: int) -> str:
    """A client string fit to store and log: at most `limit` characters, valid UTF-8 (lone
    surrogates from undecodable header bytes replaced), no control characters."""
    value = value[:limit]
    if value.isascii() and value.isprintable():
        return value
    value = value.encode("utf-8", "replace").decode("utf-8")
    return "".join(
        c if c.isprintable() and unicodedata.category(c) != "Cs" else "\ufffd" for c in value
    )


def client_request_id(value: str | None) -> str | None:
    return None if not value else clean_text(value, MAX_REQUEST_ID_CHARS)


def task_id(value: str | None) -> str | None:
    """The client's task id; blank (or absent) means the request is its own task."""
    if value is None or not value.strip():
        return None
    return clean_text(value.strip(), MAX_TASK_ID_CHARS)


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
            f"the model `{clean_text(model, 200)}` does not exist or is not served here; "
            f"GET /v1/models lists what is (e.g. {known})",
            param="model",
        )
    return route
