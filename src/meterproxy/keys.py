"""Typed application keys: the only way handlers reach shared state."""

from __future__ import annotations

from aiohttp import web

from .runtime import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
