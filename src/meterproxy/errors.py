"""The error tree: every error the proxy itself answers with, and how it renders.

    ProxyError                      status  type                    code
    ├── InvalidRequest              400     invalid_request_error   (varies)
    │   ├── MalformedJSON           400     invalid_request_error   invalid_json
    │   ├── InvalidType             400     invalid_request_error   invalid_type
    │   ├── InvalidValue            400     invalid_request_error   invalid_value
    │   ├── InvalidPath             400     invalid_request_error   invalid_path
    │   ├── MaxTokensExceeded       400     invalid_request_error   max_tokens_exceeded
    │   ├── InvalidAPIKey           401     invalid_request_error   invalid_api_key
    │   ├── ModelNotAllowed         403     invalid_request_error   model_not_allowed
    │   ├── NotYourTask             403     invalid_request_error   not_your_task
    │   ├── ModelNotFound           404     invalid_request_error   model_not_found
    │   ├── RouteNotFound           404     invalid_request_error   unknown_url
    │   ├── TaskNotFound            404     invalid_request_error   task_not_found
    │   ├── RequestNotFound         404     invalid_request_error   request_not_found
    │   ├── RequestTimeout          408     invalid_request_error   request_timeout
    │   └── PayloadTooLarge         413     invalid_request_error   payload_too_large
    ├── RateLimited                 429     requests | tokens       rate_limit_exceeded
    ├── QuotaExhausted              429     insufficient_quota      insufficient_quota
    ├── QuotaUnavailable            503     server_error            quota_backend_unavailable
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
        self.headers: dict[str, str] = {}


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None


class MalformedJSON(InvalidRequest):
    code = "invalid_json"


class InvalidType(InvalidRequest):
    code = "invalid_type"


class InvalidValue(InvalidRequest):
    code = "invalid_value"


class InvalidPath(InvalidRequest):
    code = "invalid_path"


class RequestTimeout(InvalidRequest):
    status = 408
    code = "request_timeout"


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class RouteNotFound(InvalidRequest):
    status = 404
    code = "unknown_url"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class MaxTokensExceeded(InvalidRequest):
    code = "max_tokens_exceeded"


class InvalidAPIKey(InvalidRequest):
    status = 401
    code = "invalid_api_key"


class ModelNotAllowed(InvalidRequest):
    status = 403
    code = "model_not_allowed"


class NotYourTask(InvalidRequest):
    """Feedback about another tenant's task or request."""

    status = 403
    code = "not_your_task"


class TaskNotFound(InvalidRequest):
    status = 404
    code = "task_not_found"


class RequestNotFound(InvalidRequest):
    status = 404
    code = "request_not_found"


class _Refused(ProxyError):
    """A quota refusal: carries the limit hit, an honest Retry-After and x-ratelimit-*."""

    status = 429

    def __init__(
        self, message: str, *, limit: str, retry_after_s: int, headers: dict[str, str]
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.headers = {**headers, "retry-after": str(max(retry_after_s, 1))}


class RateLimited(_Refused):
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, limit: str, retry_after_s: int, headers: dict[str, str]
    ) -> None:
        super().__init__(message, limit=limit, retry_after_s=retry_after_s, headers=headers)
        # OpenAI's type says which window ran out: "requests" or "tokens".
        self.type = "tokens" if "token" in limit else "requests"


class QuotaExhausted(_Refused):
    type = "insufficient_quota"
    code = "insufficient_quota"


class QuotaUnavailable(ProxyError):
    """The shared quota store cannot be reached and the limit fails closed."""

    status = 503
    type = "server_error"
    code = "quota_backend_unavailable"

    def __init__(self, message: str, *, limit: str = "backend") -> None:
        super().__init__(message)
        self.limit = limit
        self.headers = {"retry-after": "1"}


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
