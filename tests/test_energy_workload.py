"""A streamed share's work per interval: its decode tokens and their context (each token's
prompt and tokens before it, half of its own chunk), whatever the chunks; tokens stamped after
an interval's end (they arrive while it is still closing) wait for the next one; the upstream's
prompt count applies to every token not yet placed."""

from __future__ import annotations

import random

import pytest

from meterproxy.energy.workload import Share

MS = 1_000_000


def stream(prompt: float) -> Share:
    share = Share(("m", "u", "t"), True, 0, prompt, prompt, 0.0)
    share.enter_ns = 0
    return share


def feed(share: Share, t_ns: int, n: int) -> None:
    """What `Engine.decoded` records."""
    share.seen += n
    share.tokens.append((t_ns, share.seen))


def per_token(prompt: float, generated: float, chunks: list[int]) -> float:
    """The context of these chunks, token chunk by token chunk (ktokens)."""
    context = 0.0
    for n in chunks:
        context += n * (prompt + generated + n / 2)
        generated += n
    return context / 1000


def test_an_interval_holds_its_tokens_context_whatever_the_chunks() -> None:
    rng = random.Random(7)
    share = stream(300.0)
    t, generated = 0, 0.0
    for k in range(1, 20):
        chunks = [rng.randint(1, 6) for _ in range(rng.randint(0, 9))]
        for n in chunks:
            t += rng.randint(1, 9) * MS
            feed(share, t, n)
        te = k * 100 * MS
        t = max(t, te)
        res, prefill, decode, context = share.advance(te - 100 * MS, te, 20 * MS)
        assert (res, prefill, decode) == (100 * MS, 0.0, sum(chunks))
        assert context == pytest.approx(per_token(300.0, generated, chunks), rel=1e-12)
        generated += sum(chunks)
    assert share.generated == generated == share.seen


def test_tokens_stamped_after_the_end_wait_for_the_next_interval() -> None:
    share = stream(100.0)
    for t_ms, n in ((10, 1), (50, 2), (99, 1), (101, 3), (130, 1)):
        feed(share, t_ms * MS, n)
    first = share.advance(0, 100 * MS, 20 * MS)
    assert first[2] == 4.0 and first[3] == pytest.approx(per_token(100.0, 0.0, [1, 2, 1]))
    share.prompt = 1000.0  # the upstream's count, for what is not yet placed
    second = share.advance(100 * MS, 200 * MS, 20 * MS)
    assert second[2] == 4.0 and second[3] == pytest.approx(per_token(1000.0, 4.0, [3, 1]))
    assert not share.tokens and share.advance(200 * MS, 300 * MS, 20 * MS)[2:] == (0.0, 0.0)


def test_an_interval_whose_tokens_all_came_after_its_end_holds_none() -> None:
    share = stream(100.0)
    feed(share, 150 * MS, 2)
    assert share.advance(0, 100 * MS, 20 * MS)[2:] == (0.0, 0.0)
    assert share.advance(100 * MS, 200 * MS, 20 * MS)[2] == 2.0
