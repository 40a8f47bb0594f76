"""/, /ui and /ui/data through the real server: who may read the data, what it holds (figures
that match the registry, never a key, prompt or client string), and the page's headers."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai

from meterproxy.policy import hash_key

from .conftest import Proxy, StartProxy, Upstream

ADMIN_KEY = "admin-key-for-tests"
TENANT_KEY = "tenant-key-for-tests"
PROMPT = "the secret launch date is in the prompt"
CLIENT_USER = "alice@example.com"


def tenants_tree(upstream: Upstream, **auth: Any) -> dict[str, Any]:
    return {
        "upstreams": [{"name": "local", "url": upstream.url, "kind": "vllm"}],
        "auth": auth,
        "tenants": {"research": {"keys": [f"sha256:{hash_key(TENANT_KEY)}"]}},
    }


async def get(http: aiohttp.ClientSession, url: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.get(url, headers=headers) as r:
        return r.status, r.headers, await r.text()


async def test_index_links_the_page_and_the_page_is_self_contained(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    status, _, index = await get(http, proxy.url + "/")
    assert status == 200 and 'href="ui"' in index and 'href="metrics"' in index
    for path in ("/ui", "/ui/"):
        status, headers, page = await get(http, proxy.url + path)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert "connect-src 'self'" in headers["Content-Security-Policy"]
        assert "<script>" in page and "src=" not in page.replace("script-src", "")
        fetched = page.replace('"http://www.w3.org/2000/svg"', "")  # a namespace, not a fetch
        assert "http://" not in fetched and "https://" not in fetched  # no CDN, nothing external
    status, _, _ = await get(http, proxy.url + "/uix")
    assert status == 404


async def test_data_is_open_without_tenants_and_matches_the_registry(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    for _ in range(3):
        await client.chat.completions.create(
            model="sim-llama", messages=[{"role": "user", "content": PROMPT}]
        )
    await client.close()
    async with http.get(proxy.url + "/ui/data") as r:
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        data = await r.json()
    (row,) = data["models"]
    assert (row["model"], row["upstream"]) == ("sim-llama", "local")
    assert row["requests"] == proxy.total("meterproxy_requests_total") == 3
    assert row["tokens"] == proxy.total("meterproxy_tokens_total", type="prompt") + proxy.total(
        "meterproxy_tokens_total", type="completion"
    )
    assert [t["tenant"] for t in data["tenants"]] == ["anonymous"]


async def test_with_tenants_only_an_admin_key_reads_the_data(
    start_proxy: StartProxy, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        tenants_tree(upstream, admin_keys=["env:ADMIN_KEY"]), {"ADMIN_KEY": ADMIN_KEY}
    )
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TENANT_KEY, max_retries=0)
    await client.chat.completions.create(
        model="sim-llama",
        messages=[{"role": "user", "content": PROMPT}],
        user=CLIENT_USER,
        extra_headers={"x-request-id": "client-request-7"},
    )
    await client.close()

    for key in (None, TENANT_KEY, "wrong"):
        status, headers, body = await get(http, proxy.url + "/ui/data", key)
        assert status == 401 and headers["Content-Type"] == "application/json", key
        assert '"type":"invalid_request_error"' in body and "auth.admin_keys" in body
    status, _, body = await get(http, proxy.url + "/ui/data", ADMIN_KEY)
    assert status == 200
    for secret in (ADMIN_KEY, TENANT_KEY, hash_key(TENANT_KEY), PROMPT, CLIENT_USER, "client-"):
        assert secret not in body
    # The page itself is static and holds nothing: it asks for the key.
    status, _, page = await get(http, proxy.url + "/ui")
    assert status == 200 and ADMIN_KEY not in page


async def test_tenants_without_admin_keys_say_what_to_configure(
    start_proxy: StartProxy, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(tenants_tree(upstream))
    status, _, body = await get(http, proxy.url + "/ui/data", TENANT_KEY)
    assert status == 401
    assert "none is configured; add one to auth.admin_keys" in body
