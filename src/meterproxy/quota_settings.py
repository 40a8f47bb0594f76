"""Where quota state lives and what happens when that store fails: `quota.backend` (local, or
Redis shared by replicas), its URL and timeout, the reservation TTL, and `on_backend_error`
per limit class. Pure: validated here, used by the backends."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .policy import Limits
from .validation import Checker, show

BACKENDS = ("local", "redis")
MODES = ("closed", "open")
# Limit classes: per-minute windows and concurrency ("rate"), day and month budgets ("budget").
RATE_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
BUDGET_LIMITS = ("tokens_per_day", "usd_per_month", "joules_per_day")


@dataclass(frozen=True)
class QuotaBackendSettings:
    backend: str = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "meterproxy"
    # One admission's round trip to the store; past it the store counts as down.
    timeout_s: float = 0.1
    # A reservation not refreshed for this long is freed (its replica died).
    reservation_ttl_s: float = 30.0
    # How often Redis is compared with the ledger (the drift metric).
    drift_check_s: float = 60.0
    # When the store is down: refuse (closed) or admit uncounted (open), per limit class.
    on_error_rate: str = "closed"
    on_error_budget: str = "closed"

    def fails_closed(self, limits: Limits) -> bool:
        """Whether a tenant with these limits is refused while the store is down: yes if any
        limit it has is of a class configured `closed`."""
        classes = (
            (self.on_error_rate, RATE_LIMITS),
            (self.on_error_budget, BUDGET_LIMITS),
        )
        return any(
            mode == "closed" and any(getattr(limits, name) is not None for name in names)
            for mode, names in classes
        )

    @property
    def redis_location(self) -> str:
        """host:port/db of the Redis URL, without credentials (for messages and logs)."""
        parts = urlsplit(self.redis_url)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        return where + (parts.path if parts.path not in ("", "/") else "")


def parse_quota_backend(check: Checker, value: Any) -> QuotaBackendSettings:
    """The backend keys of the `quota` mapping (its unknown keys are reported by policy.py)."""
    tree = value if isinstance(value, dict) else {}
    d = QuotaBackendSettings()
    backend = tree.get("backend", d.backend)
    if backend not in BACKENDS:
        check.fail("quota.backend", f"expected local or redis, got {show(backend)}")
        backend = d.backend
    url = check.string(tree.get("redis_url"), "quota.redis_url", d.redis_url) or d.redis_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        check.fail(
            "quota.redis_url", f"expected redis://host:port/db (or rediss://, unix://), got {url!r}"
        )
    if backend == "redis" and importlib.util.find_spec("redis") is None:
        check.fail("quota.backend", "redis needs the Redis client: pip install 'meterproxy[redis]'")
    prefix = check.string(tree.get("redis_prefix"), "quota.redis_prefix", d.redis_prefix)
    rate, budget = _modes(check, tree.get("on_backend_error"))
    settings = QuotaBackendSettings(
        backend=str(backend),
        redis_url=url,
        redis_prefix=prefix or d.redis_prefix,
        timeout_s=check.positive(tree.get("timeout_s"), "quota.timeout_s", d.timeout_s),
        reservation_ttl_s=check.positive(
            tree.get("reservation_ttl_s"), "quota.reservation_ttl_s", d.reservation_ttl_s
        ),
        drift_check_s=check.positive(
            tree.get("drift_check_s"), "quota.drift_check_s", d.drift_check_s
        ),
        on_error_rate=rate,
        on_error_budget=budget,
    )
    if settings.timeout_s > 10:
        check.fail(
            "quota.timeout_s",
            f"at most 10 s (every admission waits this long), got {show(settings.timeout_s)}",
        )
    if settings.reservation_ttl_s < 1:
        check.fail(
            "quota.reservation_ttl_s", "at least 1 s (reservations are refreshed at a third of it)"
        )
    return settings


def _modes(check: Checker, value: Any) -> tuple[str, str]:
    """`closed` | `open`, or {rate: ..., budget: ...} when the classes differ."""
    d = QuotaBackendSettings()
    if value is None:
        return d.on_error_rate, d.on_error_budget
    if isinstance(value, dict):
        tree = check.mapping(value, "quota.on_backend_error", ("rate", "budget"))
        out = []
        for name in ("rate", "budget"):
            mode = tree.get(name, "closed")
            if mode not in MODES:
                check.fail(
                    f"quota.on_backend_error.{name}", f"expected closed or open, got {show(mode)}"
                )
                mode = "closed"
            out.append(str(mode))
        return out[0], out[1]
    if value not in MODES:
        check.fail(
            "quota.on_backend_error",
            "expected closed, open or {rate: closed|open, budget: closed|open}, "
            f"got {show(value)}",
        )
        return d.on_error_rate, d.on_error_budget
    return str(value), str(value)
