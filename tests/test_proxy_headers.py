"""Which headers cross the proxy: hop-by-hop ones stay on their hop, the client's proxy key and
the proxy's own task header never travel upstream, lengths and encodings are recomputed."""

from __future__ import annotations

from meterproxy.proxy_headers import HOP_BY_HOP, REQUEST_DROP, RESPONSE_DROP

# RFC 9110 7.6.1 and its predecessors (RFC 2616 13.5.1's list, which proxies still honour).
RFC_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


def test_names_are_lower_case_since_callers_compare_lowered_names() -> None:
    for names in (HOP_BY_HOP, REQUEST_DROP, RESPONSE_DROP):
        assert all(name == name.lower().strip() for name in names)


def test_every_hop_by_hop_header_is_dropped_both_ways() -> None:
    assert RFC_HOP_BY_HOP <= HOP_BY_HOP
    assert HOP_BY_HOP <= REQUEST_DROP and HOP_BY_HOP <= RESPONSE_DROP
    # Lengths are the proxy's to compute (it may rewrite a body); the host is the upstream's.
    assert {"content-length", "host"} <= HOP_BY_HOP


def test_the_clients_credentials_and_task_header_never_go_upstream() -> None:
    assert {"authorization", "api-key", "proxy-authorization", "x-meterproxy-task"} <= REQUEST_DROP


def test_the_upstream_may_not_pick_the_encoding_the_client_gets() -> None:
    # The proxy decompresses upstream bodies to meter them; the client gets them plain.
    assert "accept-encoding" in REQUEST_DROP and "content-encoding" in RESPONSE_DROP


def test_end_to_end_headers_pass_untouched() -> None:
    for name in ("content-type", "x-request-id", "openai-organization", "user-agent", "accept"):
        assert name not in REQUEST_DROP
    for name in ("content-type", "x-ratelimit-remaining-tokens", "retry-after", "location"):
        assert name not in RESPONSE_DROP
