"""One short handler per endpoint, and the route table."""

from __future__ import annotations

from aiohttp import web

from . import auth, discovery, errors, proxy
from .keys import RUNTIME
from .ui import web as ui_web


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await proxy.serve(request, request.app[RUNTIME], "chat_completions")


async def completions(request: web.Request) -> web.StreamResponse:
    return await proxy.serve(request, request.app[RUNTIME], "completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await proxy.serve(request, request.app[RUNTIME], "embeddings")


async def responses(request: web.Request) -> web.StreamResponse:
    return await proxy.serve(request, request.app[RUNTIME], "responses")


async def other(request: web.Request) -> web.StreamResponse:
    return await proxy.serve_other(request, request.app[RUNTIME])


async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        tenant = auth.authenticate(runtime.settings.tenancy, request.headers)
    except errors.ProxyError as error:
        return proxy.error_response(error, runtime.new_request_id())
    # A tenant sees only the models it may use.
    data = [m for m in runtime.router.listing if tenant.allows(m["id"])]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        tenant = auth.authenticate(runtime.settings.tenancy, request.headers)
    except errors.ProxyError as refused:
        return proxy.error_response(refused, runtime.new_request_id())
    model = request.match_info["model"]
    found = runtime.router.model_object(model)
    if found is None or not tenant.allows(model):
        missing = errors.ModelNotFound(f"the model `{model[:200]}` does not exist", param="model")
        return proxy.error_response(missing, runtime.new_request_id())
    return web.json_response(found)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if discovery.is_ready(runtime):
        return web.Response(text="ready\n")
    reason = "draining" if runtime.draining else "no upstream has answered recently"
    return web.Response(status=503, text=f"not ready: {reason}\n")


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    response = web.Response(body=runtime.metrics.exposition())
    response.headers["Content-Type"] = runtime.metrics.content_type
    return response


async def not_found(request: web.Request) -> web.Response:
    error = errors.RouteNotFound(f"no route for {request.method} {request.path[:200]}")
    return proxy.error_response(error, request.app[RUNTIME].new_request_id())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_route("*", "/v1/{tail:.*}", other)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    ui_web.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", not_found)
