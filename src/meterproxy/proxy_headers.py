"""Which headers cross the proxy: hop-by-hop headers (RFC 9110 7.6.1) stay on their hop, and
the client's proxy key never travels upstream."""

from __future__ import annotations

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus those the
# proxy owns: the client's proxy key never travels upstream, lengths are recomputed.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


# x-meterproxy-task is the proxy's own grouping header: task ids are not the upstream's business.
REQUEST_DROP = HOP_BY_HOP | {
    "authorization",
    "api-key",
    "accept-encoding",
    "expect",
    "x-meterproxy-task",
}


RESPONSE_DROP = HOP_BY_HOP | {"content-encoding"}
