"""The error tree: every error the proxy itself answers with, and how it renders.

    ProxyError                      status  type                    code
    ├── InvalidRequest              400     invalid_request_error   (varies)
    │   ├── MalformedJSON           400     invalid_request_error   invalid_json
    │   ├── ModelNotFound           404     invalid_request_error   model_not_found
    │   ├── RouteNotFound           404     invalid_request_error   unknown_url
    │   └── PayloadTooLarge         413     invalid_request_error   payload_too_large
    └── UpstreamError               502     upstream_error          (varies)
        ├── UpstreamUnreachable     502     upstream_error          upstream_unreachable
        ├── UpstreamTimeout         504     upstream_error          upstream_timeout
        ├── UpstreamBadResponse     502     upstream_error          upstream_bad_response
        └── UpstreamAuthRejected    502     upstream_error          upstream_auth_rejected

Handlers raise; `render` is the one place an OpenAI error body is built.
`ConfigError` is separate: it never reaches a client.
"""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None


class MalformedJSON(InvalidRequest):
    code = "invalid_json"


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class RouteNotFound(InvalidRequest):
    status = 404
    code = "unknown_url"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class UpstreamError(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamBadResponse(UpstreamError):
    code = "upstream_bad_response"


class UpstreamAuthRejected(UpstreamError):
    code = "upstream_auth_rejected"


def render(error: ProxyError) -> bytes:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    return orjson.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": error.param,
                "code": error.code,
            }
        }
    )


class ConfigError(Exception):
    """A configuration file that cannot be used; `problems` lists every `path: reason`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
