"""The calibration floor: a bare aiohttp pass-through proxy with no metering at all.

Same stack as meterproxy (aiohttp server and client, uvloop), none of its work: no parsing,
no usage, no metrics. Whatever meterproxy costs above this is the price of metering.

    python benchmarks/bare_proxy.py --upstream http://127.0.0.1:8000 --port 8081
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "host",
        "content-length",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


async def forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with session.request(
        request.method,
        request.app[UPSTREAM] + request.path_qs,
        data=body,
        headers=headers,
        allow_redirects=False,
    ) as upstream:
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        if upstream.content_length is not None:
            payload = await upstream.read()
            return web.Response(status=upstream.status, body=payload, headers=out_headers)
        response = web.StreamResponse(status=upstream.status, headers=out_headers)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application) -> object:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
    )
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)  # type: ignore[arg-type]
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
