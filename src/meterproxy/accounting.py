"""Usage at the end of a request: the upstream's own numbers when it reported them, else the
text to count (a labelled tiktoken estimate, counted at settlement off the loop)."""

from __future__ import annotations

from typing import Any

from . import usage
from .endpoints import failed_body, truncated_body
from .exchange import Exchange, Outcome
from .watch import StreamWatch, text_of


def body_end(ex: Exchange, parsed: Any, *, complete: bool) -> None:
    """A non-streamed answer: its usage, else its text to be counted; truncation noted."""
    found = usage.from_body(parsed)
    if found is not None and complete:
        ex.account(found)
    elif ex.endpoint.metered:
        ex.pending_text = text_of(parsed)
    if failed_body(ex.endpoint, parsed):
        ex.broke("in_band_error")
    elif truncated_body(ex.endpoint, parsed):
        ex.truncated()


def stream_end(ex: Exchange, watch: StreamWatch) -> None:
    """A stream that ended (well or broken): the last usage it carried, else its text."""
    ex.first_token_ns = watch.first_token_ns
    complete = ex.outcome is Outcome.SUCCESS
    found = watch.usage(usage.Source.UPSTREAM if complete else usage.Source.PARTIAL)
    if found is not None:
        ex.account(found)
    elif ex.endpoint.metered:
        ex.pending_text = watch.text()


def client_left(ex: Exchange, watch: StreamWatch | None) -> None:
    """The client hung up (we may be being cancelled): note what was done, synchronously.
    After the final event was relayed this changes nothing but reading the usage."""
    if not ex.client_left() and not ex.final_relayed:
        return
    if ex.route is None or ex.body is None or not ex.reached_upstream:
        return
    if watch is not None:
        stream_end(ex, watch)
    elif ex.endpoint.metered and not ex.usage.known and ex.pending_text is None:
        ex.pending_text = ""  # the prompt was processed; nothing was seen of the answer
