"""Duplicate detection's parts: the normalized form, the salted digest, the window."""

from __future__ import annotations

from meterproxy.value.duplicates import RepeatWindow, digest, normalized, salt_key

KEY = salt_key("a-salt-for-tests-only")
BODY = {"model": "alias", "messages": [{"role": "user", "content": "Write a haiku"}], "n": 1}
S = 10**9


def test_the_normal_form_ignores_transport_and_spacing_but_not_the_question() -> None:
    base = digest(KEY, "chat_completions", "m", BODY)
    same = {
        "n": 1,
        "messages": [{"content": "  Write\na   haiku ", "role": "user"}],
        "model": "another-alias",  # the routed model decides, not the name the client used
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "bot-7",
        "metadata": {"run": "42"},
    }
    assert digest(KEY, "chat_completions", "m", same) == base
    for different in (
        {**BODY, "n": 2},
        {**BODY, "temperature": 0},
        {**BODY, "messages": [{"role": "user", "content": "Write a sonnet"}]},
    ):
        assert digest(KEY, "chat_completions", "m", different) != base
    assert digest(KEY, "completions", "m", BODY) != base
    assert digest(KEY, "chat_completions", "other-model", BODY) != base


def test_the_digest_is_keyed_and_holds_no_text() -> None:
    assert digest(salt_key("another-salt-entirely"), "chat_completions", "m", BODY) != digest(
        KEY, "chat_completions", "m", BODY
    )
    key = digest(KEY, "chat_completions", "m", BODY)
    assert len(key) == 16 and b"haiku" not in key
    assert b"haiku" in normalized("chat_completions", "m", BODY)  # only ever hashed


def test_the_window_slides_with_each_answer_and_is_per_tenant() -> None:
    window = RepeatWindow()
    w = 10 * S
    assert not window.repeats("a", b"k", 0, w)
    window.answered("a", b"k", 0, w)
    assert window.repeats("a", b"k", 5 * S, w)
    assert not window.repeats("b", b"k", 5 * S, w)
    window.answered("a", b"k", 5 * S, w)  # refreshed: a loop stays a duplicate
    assert window.repeats("a", b"k", 14 * S, w)
    assert not window.repeats("a", b"k", 16 * S, w)
    assert window.repeats("a", b"k", 1 * S, w)  # settled out of order: still a pair


def test_the_window_forgets_what_is_too_old_and_stays_bounded() -> None:
    window = RepeatWindow(max_entries=3)
    for i in range(5):
        window.answered("a", bytes([i]), i * S, 100 * S)
    assert len(window) == 3 and not window.repeats("a", bytes([0]), 5 * S, 100 * S)
    window.answered("a", b"new", 1000 * S, 10 * S)
    assert len(window) == 1
