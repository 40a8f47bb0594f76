"""Step 4 of the request path: the tenant's policy decides before any upstream byte is sent.

Model allow-list (403), max_tokens_per_request (400, or the limit filled in when the client set
none), then the quota: a reservation of the prompt estimate plus max_tokens (429 on refusal).
"""

from __future__ import annotations

from typing import Any

from .errors import MaxTokensExceeded, ModelNotAllowed
from .policy import Limits, Tenant
from .quota import Ticket, reserve_estimate
from .routing import Route
from .runtime import Runtime
from .tokens import off_loop

# Where each endpoint takes its output cap, preferred field first.
MAX_TOKEN_FIELDS = {
    "chat_completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
_NO_LIMITS = Limits()


async def admit(
    runtime: Runtime, tenant: Tenant, route: Route, body: dict[str, Any], endpoint: str
) -> tuple[Ticket | None, bool]:
    """Returns the quota ticket (None when the tenant has no limits) and whether the body was
    changed (a max_tokens filled in)."""
    requested = body.get("model")
    if not tenant.allows(route.model) and not (
        isinstance(requested, str) and tenant.allows(requested)
    ):
        allowed = ", ".join(tenant.models or ())
        raise ModelNotAllowed(
            f"tenant `{tenant.name}` may not use model `{route.model}` (allowed: {allowed}); "
            "ask your platform team to add it",
            param="model",
        )
    limits = tenant.limits
    if limits == _NO_LIMITS:
        return None, False
    modified = False
    fields = MAX_TOKEN_FIELDS.get(endpoint, ())
    field, max_tokens = next(
        ((f, body[f]) for f in fields if isinstance(body.get(f), int)), (None, None)
    )
    cap = limits.max_tokens_per_request
    if cap is not None and fields:
        if max_tokens is not None and max_tokens > cap:
            raise MaxTokensExceeded(
                f"{field} is {max_tokens:,} but tenant `{tenant.name}` may ask for at most "
                f"{cap:,} tokens per request; lower {field}",
                param=field,
            )
        if max_tokens is None:
            body[fields[-1] if endpoint == "chat_completions" else fields[0]] = cap
            modified = True
    estimate = 0
    if limits.tokens_per_minute is not None or limits.tokens_per_day is not None:
        counter, model = runtime.tokens, route.model
        size = sum(len(str(v)) for v in body.values())
        prompt = await off_loop(size, lambda: counter.count_prompt(model, endpoint, body))
        estimate = reserve_estimate(limits, prompt, max_tokens)
    ticket = runtime.quota.admit(tenant, estimate, runtime.clock(), runtime.wall_clock())
    return ticket, modified
