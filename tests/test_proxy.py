"""The request path's pure parts: foreign (aiohttp) exceptions translated through one table into
an upstream failure kind and the proxy's error, and the headers that go upstream."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from aiohttp import (
    ClientConnectionResetError,
    ClientConnectorCertificateError,
    ClientConnectorDNSError,
    ClientConnectorError,
    ClientError,
    ClientOSError,
    ClientPayloadError,
    ClientResponseError,
    ConnectionTimeoutError,
    RequestInfo,
    ServerDisconnectedError,
    ServerTimeoutError,
    SocketTimeoutError,
)
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from meterproxy import errors
from meterproxy.config import Timeouts, Upstream
from meterproxy.proxy import _translate, upstream_headers
from meterproxy.routing import Route

from .factories import exchange

UP = Upstream("gpu-a", "http://10.0.0.7:8000/v1", timeouts=Timeouts(connect_s=2.5, first_byte_s=90))
ROUTE = Route(UP, "m")
KEY = ConnectionKey("10.0.0.7", 8000, False, True, None, None, None, None)
INFO = RequestInfo(
    URL("http://10.0.0.7:8000/v1/chat/completions"), "POST", CIMultiDictProxy(CIMultiDict())
)


def refused() -> OSError:
    return ConnectionRefusedError(111, "Connection refused")


@pytest.mark.parametrize(
    ("exc", "kind", "error", "says"),
    [
        (ConnectionTimeoutError(), "connect_timeout", errors.UpstreamTimeout, "within 2.5s"),
        (SocketTimeoutError(), "first_byte_timeout", errors.UpstreamTimeout, "within 90s"),
        (ServerTimeoutError(), "first_byte_timeout", errors.UpstreamTimeout, "within 90s"),
        (asyncio.TimeoutError(), "first_byte_timeout", errors.UpstreamTimeout, "first_byte"),
        (ClientConnectorError(KEY, refused()), "connect", errors.UpstreamUnreachable, "running?"),
        (
            ClientConnectorDNSError(KEY, OSError(-2, "no name")),
            "connect",
            errors.UpstreamUnreachable,
            "unreachable",
        ),
        (
            ClientConnectorCertificateError(KEY, ssl.SSLCertVerificationError("bad cert")),
            "connect",
            errors.UpstreamUnreachable,
            "unreachable",
        ),
        (ServerDisconnectedError(), "reset", errors.UpstreamBadResponse, "without answering"),
        (
            ClientResponseError(INFO, ()),
            "bad_response",
            errors.UpstreamBadResponse,
            "not valid HTTP",
        ),
        (
            ClientOSError(104, "Connection reset by peer"),
            "reset",
            errors.UpstreamUnreachable,
            "being sent",
        ),
        (ClientConnectionResetError(), "reset", errors.UpstreamUnreachable, "being sent"),
        (ClientPayloadError(), "reset", errors.UpstreamUnreachable, "being sent"),
        (ClientError(), "reset", errors.UpstreamUnreachable, "being sent"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_each_aiohttp_failure_maps_to_its_kind_and_error(
    exc: BaseException, kind: str, error: type[errors.ProxyError], says: str
) -> None:
    found_kind, found = _translate(exc, ROUTE)
    assert found_kind == kind
    assert type(found) is error
    assert found.message.startswith("upstream `gpu-a` ") and says in found.message


def test_timeouts_answer_504_and_the_rest_502() -> None:
    _, timeout = _translate(ConnectionTimeoutError(), ROUTE)
    _, gone = _translate(ServerDisconnectedError(), ROUTE)
    assert timeout.status == 504 and timeout.code == "upstream_timeout"
    assert gone.status == 502 and gone.code == "upstream_bad_response"


def test_an_exception_outside_the_table_is_not_swallowed() -> None:
    with pytest.raises(ValueError, match="a bug"):
        _translate(ValueError("a bug"), ROUTE)


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_hop_by_hop_headers_and_the_clients_credentials_stay_at_the_proxy() -> None:
    sent = headers(
        ("Host", "proxy.internal:8080"),
        ("Authorization", "Bearer sk-tenant-key"),
        ("api-key", "sk-tenant-key"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Content-Type", "application/json"),
        ("Content-Length", "42"),
        ("Transfer-Encoding", "chunked"),
        ("Accept-Encoding", "gzip"),
        ("Expect", "100-continue"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("X-Meterproxy-Task", "t-1"),
        ("OpenAI-Organization", "org-1"),
        ("User-Agent", "OpenAI/Python 1.40"),
    )
    out = upstream_headers(sent, ROUTE, exchange(key="mp-k-9"))
    assert list(out.items()) == [
        ("Content-Type", "application/json"),
        ("OpenAI-Organization", "org-1"),
        ("User-Agent", "OpenAI/Python 1.40"),
        ("x-request-id", "mp-k-9"),
    ]


def test_headers_the_client_names_in_connection_are_hop_by_hop_too() -> None:
    sent = headers(
        ("Connection", "keep-alive, X-Hop ,x-other"),
        ("X-Hop", "1"),
        ("x-other", "2"),
        ("X-Kept", "3"),
    )
    out = upstream_headers(sent, ROUTE, exchange())
    assert "X-Hop" not in out and "x-other" not in out and out["X-Kept"] == "3"
    assert "Connection" not in out


def test_the_upstream_key_replaces_the_clients_and_the_request_id_is_forwarded() -> None:
    keyed = Route(Upstream("hosted", "https://api.example.com/v1", api_key="sk-upstream"), "m")
    sent = headers(("Authorization", "Bearer sk-tenant"), ("X-Request-Id", "client-raw"))
    out = upstream_headers(sent, keyed, exchange(key="mp-k-2", client_request_id="client-1"))
    assert out.getall("Authorization") == ["Bearer sk-upstream"]
    assert out.getall("x-request-id") == ["client-1"]  # the sanitized copy, once
    # Without an upstream key, no Authorization goes at all.
    bare = upstream_headers(sent, ROUTE, exchange(key="mp-k-3"))
    assert "Authorization" not in bare and bare.getall("x-request-id") == ["mp-k-3"]


def test_a_request_whose_connection_never_opened_did_not_reach_its_upstream() -> None:
    # Nothing was sent, so nothing is billed or reconciled against the engine.
    from meterproxy.proxy import _FAILURES, NOT_CONNECTED

    assert {"connect", "connect_timeout"} == NOT_CONNECTED
    kinds = {kind for _, kind, _, _ in _FAILURES}
    assert NOT_CONNECTED <= kinds
    assert not {"first_byte_timeout", "reset", "bad_response"} & NOT_CONNECTED
