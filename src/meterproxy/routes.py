"""One short handler per endpoint, and the route table (from the endpoint table)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from . import auth, discovery, errors, proxy
from .endpoints import OTHER, TABLE, Endpoint
from .keys import RUNTIME
from .ui import web as ui_web
from .value import web as value_web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _metered(endpoint: Endpoint) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, request.app[RUNTIME], endpoint)

    handler.__name__ = endpoint.name
    return handler


def _refusal(request: web.Request, error: errors.ProxyError) -> web.Response:
    return proxy.refusal(request.app[RUNTIME], error)


async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        tenant = auth.authenticate(runtime.settings.tenancy, request.headers)
    except errors.ProxyError as error:
        return _refusal(request, error)
    # A tenant sees only the models it may use.
    data = [m for m in runtime.router.listing if tenant.allows(m["id"])]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        tenant = auth.authenticate(runtime.settings.tenancy, request.headers)
    except errors.ProxyError as refused:
        return _refusal(request, refused)
    model = request.match_info["model"]
    found = runtime.router.model_object(model)
    if found is None or not tenant.allows(model):
        missing = errors.ModelNotFound(f"the model `{model[:200]}` does not exist", param="model")
        return _refusal(request, missing)
    return web.json_response(found)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if discovery.is_ready(runtime):
        return web.Response(text="ready\n")
    reason = "draining" if runtime.lifecycle.draining else "no upstream has answered recently"
    return web.Response(status=503, text=f"not ready: {reason}\n")


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    response = web.Response(body=runtime.metrics.exposition())
    response.headers["Content-Type"] = runtime.metrics.content_type
    return response


async def not_found(request: web.Request) -> web.Response:
    path = request.path[:200].encode("ascii", "backslashreplace").decode()
    return _refusal(request, errors.RouteNotFound(f"no route for {request.method} {path}"))


def add_routes(app: web.Application) -> None:
    for endpoint in TABLE:
        if endpoint.path is not None:
            app.router.add_post(endpoint.path, _metered(endpoint))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    value_web.add_routes(app)  # before the /v1 catch-all
    app.router.add_route("*", "/v1/{tail:.*}", _metered(OTHER))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    ui_web.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", not_found)
