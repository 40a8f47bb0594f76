"""Tenants, their keys, model allow-lists and limits, compiled from the config.

Keys are only ever held as SHA-256 digests: `sha256:<hex>` entries are taken as they are,
`env:VAR` entries are read from the environment at load and hashed at once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .validation import Checker, show

# The store's keys (backend, redis_url, ...) are read by quota_settings.py.
QUOTA_BACKEND_KEYS = (
    "backend",
    "redis_url",
    "redis_prefix",
    "timeout_s",
    "reservation_ttl_s",
    "drift_check_s",
    "on_backend_error",
)

ANONYMOUS = "anonymous"
DEFAULT_RESERVATION_KEY = "default"
DEFAULT_OUTPUT_RESERVATION = 4096
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    usd_per_month: float | None = None
    joules_per_day: float | None = None
    max_concurrent: int | None = None
    max_tokens_per_request: int | None = None


LIMIT_NAMES = tuple(f.name for f in fields(Limits))
_FLOAT_LIMITS = frozenset({"usd_per_month", "joules_per_day"})


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hashes: frozenset[str] = frozenset()
    models: tuple[str, ...] | None = None  # glob allow-list; None = every model
    limits: Limits = Limits()
    _allow: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def allows(self, model: str) -> bool:
        return self._allow is None or self._allow.match(model) is not None


@dataclass(frozen=True)
class Tenancy:
    mode: str = "open"  # keys | open
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    by_key: Mapping[str, str] = field(default_factory=dict, repr=False)  # digest -> tenant
    # Digests of the keys that may read the status page's data (never a tenant's key).
    admin_key_hashes: frozenset[str] = field(default=frozenset(), repr=False)
    timezone: str = "UTC"
    state_path: str = "meterproxy-quota.db"  # relative: in the state directory (--data-dir)
    # Output tokens reserved for a request that sets no cap: per model, else `default`.
    reservations: Mapping[str, int] = field(
        default_factory=lambda: {DEFAULT_RESERVATION_KEY: DEFAULT_OUTPUT_RESERVATION}
    )

    def output_reservation(self, model: str) -> int:
        found = self.reservations.get(model)
        return found if found is not None else self.reservations[DEFAULT_RESERVATION_KEY]

    def tenant(self, name: str) -> Tenant:
        found = self.tenants.get(name)
        if found is not None:
            return found
        return ANONYMOUS_TENANT if name == ANONYMOUS else Tenant(name)


ANONYMOUS_TENANT = Tenant(ANONYMOUS)


def parse_tenancy(check: Checker, top: Mapping[str, Any], environ: Mapping[str, str]) -> Tenancy:
    auth = check.mapping(top.get("auth"), "auth", ("mode", "admin_keys"))
    quota = check.mapping(
        top.get("quota"),
        "quota",
        ("timezone", "state_path", "output_reservation", *QUOTA_BACKEND_KEYS),
    )
    tenants: dict[str, Tenant] = {}
    by_key: dict[str, str] = {}
    for name, tree in check.entries(top.get("tenants"), "tenants").items():
        tenant = _tenant(check, str(name), tree, environ)
        for digest in tenant.key_hashes:
            if digest in by_key:
                check.fail(
                    f"tenants.{name}.keys",
                    f"a key is also a key of tenant "
                    f"`{by_key[digest]}`; each key belongs to one tenant",
                )
            by_key[digest] = tenant.name
        tenants[tenant.name] = tenant
    mode = auth.get("mode", "keys" if tenants else "open")
    if mode not in ("keys", "open"):
        check.fail("auth.mode", f"expected keys or open, got {show(mode)}")
        mode = "keys"
    if mode == "keys" and not by_key:
        check.fail(
            "auth.mode",
            "is `keys` but no tenant has a key; add tenants.<name>.keys or set auth.mode: open",
        )
    zone = check.string(quota.get("timezone"), "quota.timezone", "UTC") or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        check.fail("quota.timezone", f"unknown time zone {zone!r} (e.g. UTC, Europe/Paris)")
        zone = "UTC"
    path = check.string(quota.get("state_path"), "quota.state_path", Tenancy.state_path)
    reservations = {DEFAULT_RESERVATION_KEY: DEFAULT_OUTPUT_RESERVATION}
    for model, tokens in check.entries(
        quota.get("output_reservation"), "quota.output_reservation"
    ).items():
        reservations[str(model)] = check.positive_int(tokens, f"quota.output_reservation.{model}")
    admin = _digests(check, "auth.admin_keys", auth.get("admin_keys", []), environ)
    if admin & by_key.keys():
        check.fail("auth.admin_keys", "a key is also a tenant's key; give admins keys of their own")
    return Tenancy(
        mode=str(mode),
        tenants=tenants,
        by_key=by_key,
        admin_key_hashes=admin,
        timezone=zone,
        state_path=path or Tenancy.state_path,
        reservations=reservations,
    )


def _tenant(check: Checker, name: str, value: Any, environ: Mapping[str, str]) -> Tenant:
    path = f"tenants.{name}"
    tree = check.mapping(value, path, ("keys", "models", "limits"))
    digests = _digests(check, f"{path}.keys", tree.get("keys", []), environ)
    models = tree.get("models")
    allow = None
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            check.fail(
                f"{path}.models", f"expected a list of model names or globs, got {show(models)}"
            )
            models = None
        else:
            allow = re.compile("|".join(f"(?:{fnmatch.translate(m)})" for m in models))
    limits_tree = check.mapping(tree.get("limits"), f"{path}.limits", LIMIT_NAMES)
    values: dict[str, Any] = {}
    for key in LIMIT_NAMES:
        raw = limits_tree.get(key)
        if raw is None:
            continue
        if key in _FLOAT_LIMITS:
            values[key] = check.positive(raw, f"{path}.limits.{key}", 1.0)
        else:
            values[key] = check.positive_int(raw, f"{path}.limits.{key}")
    return Tenant(
        name=name,
        key_hashes=digests,
        models=tuple(models) if models is not None else None,
        limits=Limits(**values),
        _allow=allow,
    )


def _digests(check: Checker, path: str, keys: Any, environ: Mapping[str, str]) -> frozenset[str]:
    """A list of `sha256:<hex>` / `env:VAR` entries -> their SHA-256 digests."""
    if not isinstance(keys, list):
        check.fail(path, f"expected a list, got {show(keys)}")
        return frozenset()
    digests: set[str] = set()
    for i, entry in enumerate(keys):
        where = f"{path}[{i}]"
        if isinstance(entry, str) and entry.startswith("sha256:") and _HEX64.match(entry[7:]):
            digests.add(entry[7:])
        elif isinstance(entry, str) and entry.startswith("env:") and len(entry) > 4:
            secret = environ.get(entry[4:])
            if secret:
                digests.add(hash_key(secret))
            else:
                check.fail(where, f"environment variable {entry[4:]} is not set")
        else:
            check.fail(
                where,
                "expected sha256:<64 hex digits> or env:VARIABLE (plain keys do "
                "not belong in the file; `meterproxy hash-key` prints the sha256: form)",
            )
    return frozenset(digests)
