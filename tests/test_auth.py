"""Proxy key -> tenant: `Authorization: Bearer` and `api-key` headers, lookup by SHA-256 digest
only, anonymous in open mode, and the admin gate of the status data."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict

from meterproxy import config
from meterproxy.auth import authenticate, authenticate_admin, presented_key
from meterproxy.errors import InvalidAPIKey
from meterproxy.policy import ANONYMOUS, Tenancy, hash_key

RESEARCH_KEY = "sk-research-0123456789"
OPS_KEY = "sk-ops-abcdef"
ADMIN_KEY = "sk-admin-42"
UPSTREAMS = [{"name": "u", "url": "http://127.0.0.1:9/v1"}]


def tenancy(**tree: Any) -> Tenancy:
    environ = {"RESEARCH_KEY": RESEARCH_KEY, "ADMIN_KEY": ADMIN_KEY}
    return config.parse({"upstreams": UPSTREAMS, **tree}, environ).tenancy


def keyed(admin: bool = True) -> Tenancy:
    return tenancy(
        tenants={
            "research": {"keys": ["env:RESEARCH_KEY"]},
            "ops": {"keys": [f"sha256:{hash_key(OPS_KEY)}"]},
        },
        auth={"admin_keys": ["env:ADMIN_KEY"] if admin else []},
    )


def headers(**items: str) -> CIMultiDict[str]:
    return CIMultiDict((k.replace("_", "-"), v) for k, v in items.items())


@pytest.mark.parametrize(
    ("sent", "key"),
    [
        (headers(Authorization="Bearer k1"), "k1"),
        (headers(authorization="bearer  k1 "), "k1"),  # scheme case and spaces as clients vary
        (headers(AUTHORIZATION="BEARER k1"), "k1"),
        (headers(api_key="k2"), "k2"),  # Azure clients
        (headers(Api_Key=" k2 "), "k2"),
        (headers(Authorization="Bearer k1", api_key="k2"), "k1"),  # Bearer first
        (headers(Authorization="Basic dXNlcjpwYXNz", api_key="k2"), "k2"),
        (headers(Authorization="Bearer ", api_key="k2"), "k2"),
        (headers(Authorization="Basic dXNlcjpwYXNz"), None),
        (headers(Authorization="k1"), None),  # no scheme
        (headers(api_key="   "), None),
        (headers(), None),
    ],
)
def test_the_presented_key(sent: CIMultiDict[str], key: str | None) -> None:
    assert presented_key(sent) == key


def test_keys_name_their_tenant_whichever_header_carries_them() -> None:
    t = keyed()
    assert t.mode == "keys"
    assert authenticate(t, headers(Authorization=f"Bearer {RESEARCH_KEY}")).name == "research"
    assert authenticate(t, headers(api_key=OPS_KEY)).name == "ops"
    assert authenticate(t, headers(Authorization=f"Bearer {OPS_KEY}")) is t.tenants["ops"]


def test_keys_are_held_and_looked_up_only_as_digests() -> None:
    t = keyed()
    assert dict(t.by_key) == {hash_key(RESEARCH_KEY): "research", hash_key(OPS_KEY): "ops"}
    assert RESEARCH_KEY not in repr(t) and OPS_KEY not in repr(t)
    # The digest itself is not a key: presenting it finds nothing.
    with pytest.raises(InvalidAPIKey):
        authenticate(t, headers(Authorization=f"Bearer {hash_key(OPS_KEY)}"))


@pytest.mark.parametrize(
    "sent",
    [
        headers(Authorization=f"Bearer {RESEARCH_KEY[:-1]}"),  # one character short
        headers(Authorization=f"Bearer {RESEARCH_KEY}x"),
        headers(Authorization=f"Bearer {RESEARCH_KEY.upper()}"),
        headers(api_key=ADMIN_KEY),  # an admin key is not a tenant's key
    ],
)
def test_an_unknown_key_is_a_401_that_says_what_to_check(sent: CIMultiDict[str]) -> None:
    with pytest.raises(InvalidAPIKey) as refused:
        authenticate(keyed(), sent)
    assert refused.value.status == 401 and refused.value.code == "invalid_api_key"
    assert "not recognized" in refused.value.message and "OPENAI_API_KEY" in refused.value.message
    assert RESEARCH_KEY[:-1] not in refused.value.message


def test_no_key_is_a_401_that_says_how_to_send_one() -> None:
    with pytest.raises(InvalidAPIKey, match=r"no API key was sent.*Authorization: Bearer"):
        authenticate(keyed(), headers(Authorization="Basic dXNlcjpwYXNz"))


def test_open_mode_is_anonymous_whatever_is_sent() -> None:
    t = tenancy()
    assert t.mode == "open"
    for sent in (headers(), headers(Authorization="Bearer anything"), headers(api_key="x")):
        assert authenticate(t, sent).name == ANONYMOUS


def test_open_mode_with_tenants_still_lets_everyone_in_as_anonymous() -> None:
    t = tenancy(tenants={"research": {"keys": ["env:RESEARCH_KEY"]}}, auth={"mode": "open"})
    found = authenticate(t, headers(Authorization=f"Bearer {RESEARCH_KEY}"))
    assert found.name == ANONYMOUS


def test_admin_views_are_open_without_tenants_and_need_an_admin_key_with_them() -> None:
    authenticate_admin(tenancy(), headers())  # no tenants: nothing to protect
    t = keyed()
    authenticate_admin(t, headers(Authorization=f"Bearer {ADMIN_KEY}"))
    authenticate_admin(t, headers(api_key=ADMIN_KEY))
    with pytest.raises(InvalidAPIKey, match="no admin key was sent"):
        authenticate_admin(t, headers())
    with pytest.raises(InvalidAPIKey, match="not an admin key"):
        authenticate_admin(t, headers(Authorization=f"Bearer {RESEARCH_KEY}"))
    with pytest.raises(InvalidAPIKey, match=r"none is configured.*auth\.admin_keys"):
        authenticate_admin(keyed(admin=False), headers(Authorization=f"Bearer {ADMIN_KEY}"))
