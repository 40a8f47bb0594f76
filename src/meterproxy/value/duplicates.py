"""Repeated prompts: a request is reduced to a salted digest of its normalized form (never its
text), and a tenant sending the same digest again within the window is sending a duplicate.

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
    """Per tenant, when each digest was last sent; bounded (least recently sent forgotten)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._last: collections.OrderedDict[tuple[str, bytes], int] = collections.OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._last)

    def seen(self, tenant: str, key: bytes, at_ns: int, window_ns: int) -> bool:
        """Record a request started at `at_ns`; True when the same tenant sent the same request
        within `window_ns` of it (before or, when requests settle out of order, after)."""
        entry = (tenant, key)
        last = self._last.get(entry)
        repeat = last is not None and abs(at_ns - last) <= window_ns
        self._last[entry] = at_ns if last is None else max(at_ns, last)
        self._last.move_to_end(entry)
        while self._last:
            oldest = next(iter(self._last.values()))
            if len(self._last) <= self._max and oldest >= at_ns - window_ns:
                break
            self._last.popitem(last=False)
        return repeat
