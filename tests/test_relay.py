"""What the client sees of the upstream's headers and bodies: hop-by-hop headers dropped, a
redirect made relative to the proxy or dropped, the proxy's upstream key redacted wherever it is
echoed, and the request ids set by the proxy."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from meterproxy.config import Upstream
from meterproxy.relay import REDACTED, client_headers, redact

from .factories import exchange

SECRET = "sk-upstream-secret-123"
UP = Upstream("hosted", "https://api.example.com/openai/v1", api_key=SECRET)
OPEN = Upstream("local", "http://127.0.0.1:8000/v1")


def seen(pairs: list[tuple[str, str]], upstream: Upstream = UP, **ex: str) -> CIMultiDict[str]:
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    return client_headers(headers, exchange(key="mp-k-1", **ex), upstream)


def test_hop_by_hop_and_encoding_headers_stay_behind_and_the_rest_pass_as_they_are() -> None:
    out = seen(
        [
            ("Content-Type", "text/event-stream"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5"),
            ("Content-Length", "123"),
            ("Content-Encoding", "gzip"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-RateLimit-Remaining-Tokens", "99"),
        ]
    )
    assert list(out.items()) == [
        ("Content-Type", "text/event-stream"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-RateLimit-Remaining-Tokens", "99"),
        ("x-request-id", "mp-k-1"),
        ("x-meterproxy-request-id", "mp-k-1"),
    ]


def test_the_request_id_is_the_upstreams_else_the_clients_else_the_proxys_key() -> None:
    pairs = [("X-Request-Id", "sent-by-upstream-raw")]  # replaced by the sanitized copy
    assert seen(pairs)["x-request-id"] == "mp-k-1"
    assert seen(pairs, client_request_id="c-1")["x-request-id"] == "c-1"
    both = seen(pairs, client_request_id="c-1", upstream_request_id="u-1")
    assert both.getall("x-request-id") == ["u-1"]
    assert both["x-meterproxy-request-id"] == "mp-k-1"


def test_a_redirect_into_the_upstreams_api_is_made_relative_to_the_proxy() -> None:
    out = seen(
        [
            ("Location", "https://api.example.com/openai/v1/files/file-1?x=2"),
            ("Content-Location", "https://api.example.com/openai/v1/responses/r1"),
        ]
    )
    assert out["Location"] == "/v1/files/file-1?x=2"
    assert out["Content-Location"] == "/v1/responses/r1"


def test_a_redirect_anywhere_else_is_dropped() -> None:
    for location in (
        "https://login.example.com/authorize",
        "https://api.example.com/openai/v10/x",  # a prefix of the base, not under it
        "https://api.example.com/openai/v1",  # the base itself
        "https://api.example.com/other",
        "http://api.example.com/openai/v1/files",  # another scheme is another origin
        "/internal/admin",  # relative, but outside the API
        "//evil.example.com/v1/x",  # scheme-relative: another host
    ):
        out = seen([("Location", location), ("Content-Location", location)])
        assert "Location" not in out and "Content-Location" not in out, location


def test_a_relative_redirect_inside_the_api_stays_as_it_is() -> None:
    out = seen([("Location", "/v1/files/file-1"), ("Content-Location", "/v1/responses/r1")])
    assert out["Location"] == "/v1/files/file-1" and out["Content-Location"] == "/v1/responses/r1"


def test_the_upstream_key_is_redacted_wherever_a_header_echoes_it() -> None:
    out = seen(
        [
            ("X-Debug", f"auth=Bearer {SECRET}; again {SECRET}"),
            ("Location", f"https://api.example.com/openai/v1/files?key={SECRET}"),
        ]
    )
    assert out["X-Debug"] == "auth=Bearer [redacted]; again [redacted]"
    assert out["Location"] == "/v1/files?key=[redacted]"
    assert all(SECRET not in value for value in out.values())


def test_without_an_upstream_key_nothing_is_redacted() -> None:
    out = seen([("X-Debug", "None [redacted] sk-x")], OPEN)
    assert out["X-Debug"] == "None [redacted] sk-x"


def test_redact_replaces_every_copy_of_the_key_in_a_body() -> None:
    body = f'{{"error": "bad key {SECRET}", "echo": "{SECRET}"}}'.encode()
    assert redact(body, UP) == b'{"error": "bad key [redacted]", "echo": "[redacted]"}'
    assert REDACTED == b"[redacted]"
    clean = b'{"choices": []}'
    assert redact(clean, UP) is clean  # nothing to do: the same bytes, not a copy
    assert redact(body, OPEN) is body
