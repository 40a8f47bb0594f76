"""Step 4 of the request path: the tenant's policy decides before any upstream byte is sent.

Model allow-list (403), max_tokens_per_request (400, or the limit filled in when the client set
none), then the quota: a reservation of the prompt estimate plus, for each answer asked for
(`n`, `best_of`), the output cap — the client's, else the tenant's, else the configured
default reservation for the model (429 on refusal). A large prompt is estimated from its text's
bytes once the upstream's own counts have taught the model's tokens per byte (tokens.py).
"""

from __future__ import annotations

from .errors import MaxTokensExceeded, ModelNotAllowed
from .exchange import Exchange
from .intake import output_cap
from .policy import Limits
from .runtime import Runtime
from .tokens import LEARNED_FROM_BYTES, off_loop

_NO_LIMITS = Limits()


async def admit(runtime: Runtime, ex: Exchange) -> bool:
    """Takes the quota reservation (`ex.ticket`); returns whether the body was changed (a cap
    filled in)."""
    tenant, route, body, endpoint = ex.tenant, ex.route, ex.body, ex.endpoint
    assert route is not None and body is not None
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
        return False
    modified = False
    field, max_tokens = output_cap(endpoint, body)
    cap = limits.max_tokens_per_request
    if cap is not None and endpoint.fill_field is not None:
        if max_tokens is not None and max_tokens > cap:
            raise MaxTokensExceeded(
                f"{field} is {max_tokens:,} but tenant `{tenant.name}` may ask for at most "
                f"{cap:,} tokens per request; lower {field}",
                param=field,
            )
        if max_tokens is None:
            body[endpoint.fill_field] = max_tokens = cap
            modified = True
    estimate = 0
    if limits.tokens_per_minute is not None or limits.tokens_per_day is not None:
        counter, model = runtime.tokens, route.model
        prompt = None
        if ex.body_bytes >= LEARNED_FROM_BYTES:  # its text cannot be larger than its JSON
            prompt, ex.prompt_text_bytes = counter.learned_estimate(model, endpoint, body)
        if prompt is None:
            prompt = await off_loop(
                ex.body_bytes,
                lambda: counter.count_prompt(model, endpoint, body),
                ready=counter.ready(model),
            )
        if endpoint.generates:
            output = max_tokens
            if output is None:
                output = runtime.settings.tenancy.output_reservation(model)
            estimate = prompt + ex.choices * output
        else:
            estimate = prompt
    ex.ticket = await runtime.quota.admit(
        tenant, estimate, ex.key, capped=max_tokens is not None or not endpoint.generates
    )
    return modified
