"""Repeated prompts: a request is reduced to a salted digest of its normalized form (never its
text). A duplicate is a request the same tenant already got a complete answer to within the
window: asking again for an answer already received. A retry after a failure is not one.

Normalized: the routed model and endpoint, the body without transport-only fields (stream,
stream options, `user`, metadata), keys sorted, every string's whitespace collapsed. Pure.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import orjson

# Fields that change how an answer travels or is filed, not what is asked.
TRANSPORT_FIELDS = frozenset(
    {
        "model",  # replaced by the routed model, so aliases of one model match
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
    }
)


def salt_key(salt: str) -> bytes:
    """BLAKE2b keys are at most 64 bytes; any salt becomes one."""
    return hashlib.sha256(salt.encode("utf-8")).digest()


def _clean(value: Any) -> Any:
    # Recursion is bounded: intake refuses JSON nested deeper than 64 levels.
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def normalized(endpoint: str, model: str, body: dict[str, Any]) -> bytes:
    kept = {k: _clean(v) for k, v in body.items() if k not in TRANSPORT_FIELDS}
    return orjson.dumps([endpoint, model, kept], option=orjson.OPT_SORT_KEYS)


def digest(key: bytes, endpoint: str, model: str, body: dict[str, Any]) -> bytes:
    return hashlib.blake2b(normalized(endpoint, model, body), key=key, digest_size=16).digest()


class RepeatWindow:
    """Per tenant, when each digest last got a complete answer; bounded (the least recently
    answered forgotten first)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._last: collections.OrderedDict[tuple[str, bytes], int] = collections.OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._last)

    def repeats(self, tenant: str, key: bytes, at_ns: int, window_ns: int) -> bool:
        """Did the tenant get an answer to this same request, sent within `window_ns` of
        `at_ns` (before it, or after it when requests settle out of order)?"""
        last = self._last.get((tenant, key))
        return last is not None and abs(at_ns - last) <= window_ns

    def answered(self, tenant: str, key: bytes, at_ns: int, window_ns: int) -> None:
        """A request started at `at_ns` got a complete answer."""
        entry = (tenant, key)
        last = self._last.get(entry)
        self._last[entry] = at_ns if last is None else max(at_ns, last)
        self._last.move_to_end(entry)
        while self._last:
            oldest = next(iter(self._last.values()))
            if len(self._last) <= self._max and oldest >= at_ns - window_ns:
                break
            self._last.popitem(last=False)
