"""Typed application keys: the only way handlers reach shared state."""

from __future__ import annotations

from aiohttp import web

from .ledger import Ledger
from .reconcile import Reconciler
from .reload import Loader
from .runtime import Runtime
from .ui.history import History
from .value.meter import ValueMeter

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
LEDGER: web.AppKey[Ledger] = web.AppKey("ledger", Ledger)
EXPORT: web.AppKey[Ledger] = web.AppKey("export", Ledger)
STATUS: web.AppKey[History] = web.AppKey("status_history", History)
RECONCILER: web.AppKey[Reconciler] = web.AppKey("reconciler", Reconciler)
VALUE: web.AppKey[ValueMeter] = web.AppKey("value", ValueMeter)
RELOAD: web.AppKey[tuple[str, Loader]] = web.AppKey("reload", tuple)
