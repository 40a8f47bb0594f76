"""The per-request exchange: one object carries a request down the path (its key, endpoint,
tenant, route, body facts, timings) and its outcome, which changes only through the named
transitions below. Settlement freezes it into a `Settlement`.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .endpoints import Endpoint
from .errors import ProxyError, UpstreamError
from .policy import ANONYMOUS_TENANT, Tenant
from .usage import NO_USAGE, Usage

if TYPE_CHECKING:
    from .quota import Ticket
    from .routing import Route

NO_LABEL = "_none"  # model/upstream label before a request is routed


class Outcome(str, enum.Enum):
    SUCCESS = "success"  # the upstream answered 2xx/3xx and the whole answer was relayed
    REFUSED = "refused"  # the proxy answered 4xx itself (auth, validation, quota)
    UPSTREAM_REJECTED = "upstream_rejected"  # the upstream answered 4xx
    UPSTREAM_ERROR = "upstream_error"  # unreachable, timed out, 5xx, broken or failed stream
    CLIENT_DISCONNECT = "client_disconnect"  # the client left before the answer was complete
    PROXY_ERROR = "proxy_error"  # a bug in the proxy (500)


class Waste(str, enum.Enum):
    """Why generated tokens were of no use."""

    CLIENT_DISCONNECT = "client_disconnect"
    TRUNCATED = "truncated"
    UPSTREAM_ERROR = "upstream_error"
    # The same tenant sent the same normalized request within the duplicate window. The
    # reasons above say what went wrong with this answer and take precedence over it.
    DUPLICATE = "duplicate"


STATUS_CLIENT_DISCONNECT = "499"
STATUS_STREAM_BROKEN = "502"


class RequestKeys:
    """Proxy-owned request keys, unique across processes and restarts: a random 64-bit
    process prefix (fresh at every start) and a counter."""

    __slots__ = ("_next", "_prefix")

    def __init__(self) -> None:
        self._prefix = f"mp-{int(time.time()):x}{os.urandom(8).hex()}-"
        self._next = 0

    def new(self) -> str:
        self._next += 1
        return f"{self._prefix}{self._next}"


@dataclass(slots=True, eq=False)
class Exchange:
    key: str
    endpoint: Endpoint
    started_ns: int
    client_request_id: str | None = None  # bounded and sanitized by intake
    tenant: Tenant = ANONYMOUS_TENANT
    route: Route | None = None
    body: dict[str, Any] | None = None  # the parsed request (None: not JSON, or `other`)
    body_bytes: int = 0  # size of the request body as received
    stream: bool = False  # the client asked for a stream
    choices: int = 1  # answers asked for (n / best_of)
    client_user: str | None = None  # the body's `user`, bounded and sanitized
    task_id: str | None = None  # x-meterproxy-task, bounded and sanitized (None: its own task)
    ticket: Ticket | None = None  # what quota admission reserved
    prompt_text_bytes: int = 0  # the prompt's text, measured when admission estimated it
    reached_upstream: bool = False  # a byte of the request may have reached the upstream
    upstream_request_id: str | None = None  # the upstream's own x-request-id
    first_token_ns: int | None = None
    ended_ns: int = 0
    usage: Usage = NO_USAGE
    estimated: bool = False  # usage counted by the proxy, not reported by the upstream
    # Text relayed to a client that left, still to be counted (off the loop, at settlement).
    pending_text: str | None = None
    gpu_seconds: float = 0.0
    energy_j: float | None = None  # attributed GPU energy, once measured
    # -- the outcome, changed only by the transitions below --
    outcome: Outcome = Outcome.PROXY_ERROR
    status: str = "500"
    waste: Waste | None = None
    upstream_error: str | None = None  # a kind from the proxy's failure table
    final_relayed: bool = False  # the stream's final event reached the client
    duplicate: bool = False  # a repeat of a recent identical request (see `repeated`)
    settled: bool = False

    # -- labels ---------------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.route.model if self.route is not None else NO_LABEL

    @property
    def upstream(self) -> str:
        return self.route.upstream.name if self.route is not None else NO_LABEL

    # -- transitions ----------------------------------------------------------------------

    def refuse(self, error: ProxyError) -> None:
        """The proxy answers with an error of its own (before or instead of the upstream's)."""
        self.status = str(error.status)
        upstream = isinstance(error, UpstreamError)
        self.outcome = Outcome.UPSTREAM_ERROR if upstream else Outcome.REFUSED

    def upstream_failed(self, kind: str, *, reached: bool = True) -> None:
        """The upstream could not be reached or gave no usable answer (before any byte was
        relayed); `refuse` follows with the proxy's error."""
        self.upstream_error = kind
        self.reached_upstream = reached

    def answered(self, status: int) -> None:
        """The upstream's status line is being relayed."""
        self.status = str(status)
        self.outcome = Outcome.SUCCESS if status < 400 else Outcome.UPSTREAM_REJECTED
        if status >= 500:
            self.outcome = Outcome.UPSTREAM_ERROR

    def broke(self, kind: str, *, waste: bool = True) -> None:
        """The upstream broke off (or failed in-band) after its answer began: 502 recorded,
        and a stream's tokens so far are waste."""
        self.upstream_error = kind
        self.status = STATUS_STREAM_BROKEN
        self.outcome = Outcome.UPSTREAM_ERROR
        if waste:
            self.waste = Waste.UPSTREAM_ERROR

    def finished(self) -> None:
        """The answer's final event (or last byte) reached the client: whatever the client
        does next, the request is complete."""
        self.final_relayed = True

    def truncated(self) -> None:
        if self.waste is None:
            self.waste = Waste.TRUNCATED

    def client_left(self) -> bool:
        """The client hung up. False when that changes nothing: the answer was complete, or
        the request already ended otherwise."""
        if self.final_relayed or self.status == STATUS_CLIENT_DISCONNECT:
            return False
        if self.outcome is Outcome.UPSTREAM_ERROR and self.status == STATUS_STREAM_BROKEN:
            return False
        self.status = STATUS_CLIENT_DISCONNECT
        self.outcome = Outcome.CLIENT_DISCONNECT
        self.waste = Waste.CLIENT_DISCONNECT
        return True

    def repeated(self) -> None:
        """The tenant sent this same request moments ago: flagged, and its tokens are waste
        unless another reason (disconnect, truncation, upstream error) already explains them."""
        self.duplicate = True
        if self.waste is None:
            self.waste = Waste.DUPLICATE

    def account(self, usage: Usage, *, estimated: bool = False) -> None:
        self.usage = usage
        self.estimated = estimated
