"""Proxy key -> tenant. The presented key is hashed and looked up by its SHA-256 digest, so no
key text is kept, and the lookup's timing depends on the digest, never on where keys differ."""

from __future__ import annotations

from collections.abc import Mapping

from .errors import InvalidAPIKey
from .policy import ANONYMOUS, Tenancy, Tenant, hash_key


def presented_key(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer <key>` (OpenAI SDKs) or `api-key: <key>` (Azure clients)."""
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return key.strip()
    api_key = headers.get("api-key")
    return api_key.strip() if api_key and api_key.strip() else None


def authenticate(tenancy: Tenancy, headers: Mapping[str, str]) -> Tenant:
    if tenancy.mode == "open":
        return tenancy.tenant(ANONYMOUS)
    key = presented_key(headers)
    if key is None:
        raise InvalidAPIKey(
            "no API key was sent; send the key your platform team issued as "
            "`Authorization: Bearer <key>` (OPENAI_API_KEY for the OpenAI SDKs)"
        )
    name = tenancy.by_key.get(hash_key(key))
    if name is None:
        raise InvalidAPIKey(
            "the API key is not recognized by this proxy; check OPENAI_API_KEY, or ask your "
            "platform team for a key"
        )
    return tenancy.tenants[name]


def authenticate_admin(tenancy: Tenancy, headers: Mapping[str, str]) -> None:
    """Operators' views (the status page's data): open while no tenant exists; with tenants,
    only a key from `auth.admin_keys`, never a tenant's key."""
    if not tenancy.tenants:
        return
    if not tenancy.admin_key_hashes:
        raise InvalidAPIKey(
            "this proxy has tenants, so its status data needs an admin key, and none is "
            "configured; add one to auth.admin_keys (sha256:<hex> or env:VARIABLE)"
        )
    key = presented_key(headers)
    if key is None:
        raise InvalidAPIKey(
            "no admin key was sent; send a key from auth.admin_keys as "
            "`Authorization: Bearer <key>`"
        )
    if hash_key(key) not in tenancy.admin_key_hashes:
        raise InvalidAPIKey("the key is not an admin key of this proxy (auth.admin_keys)")
