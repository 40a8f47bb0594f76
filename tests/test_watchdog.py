"""The stream watchdog, on an injected clock: only bodies silent past their own limit are ended,
each once, by calling its close; progress stamps and `forget` keep a body alive."""

from __future__ import annotations

import asyncio

from meterproxy.watchdog import StreamWatchdog

S = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns


def test_only_bodies_silent_past_their_limit_are_closed_and_each_once() -> None:
    clock = Clock()
    dog = StreamWatchdog(clock)
    closed: list[str] = []
    short = dog.watch(1.0, lambda: closed.append("short"))
    long = dog.watch(5.0, lambda: closed.append("long"))
    busy = dog.watch(1.0, lambda: closed.append("busy"))
    clock.now_ns = 1 * S
    assert dog.check() == 0  # exactly at the limit is not past it
    clock.now_ns = 1 * S + 1
    busy.last_ns = clock.now_ns  # a chunk just arrived
    assert dog.check() == 1
    assert closed == ["short"] and short.tripped and not long.tripped and not busy.tripped
    clock.now_ns = 2 * S + 1  # busy has been silent for exactly its limit
    assert dog.check() == 0 and closed == ["short"]
    clock.now_ns = 10 * S
    assert dog.check() == 2
    assert sorted(closed) == ["busy", "long", "short"]
    assert dog.check() == 0 and len(closed) == 3  # never twice


def test_a_forgotten_body_is_never_closed() -> None:
    clock = Clock()
    dog = StreamWatchdog(clock)
    closed: list[int] = []
    entry = dog.watch(0.5, lambda: closed.append(1))
    dog.forget(entry)
    dog.forget(entry)  # forgetting twice (a relay's finally after a trip) is harmless
    clock.now_ns = 60 * S
    assert dog.check() == 0 and closed == [] and not entry.tripped


def test_the_limit_counts_from_when_the_body_was_watched() -> None:
    clock = Clock()
    clock.now_ns = 100 * S
    dog = StreamWatchdog(clock)
    closed: list[int] = []
    entry = dog.watch(0.25, lambda: closed.append(1))
    assert entry.last_ns == 100 * S and entry.idle_ns == S // 4
    clock.now_ns = 100 * S + S // 4
    assert dog.check() == 0
    clock.now_ns += 1
    assert dog.check() == 1 and closed == [1]


async def test_run_checks_periodically_until_cancelled() -> None:
    clock = Clock()
    dog = StreamWatchdog(clock, period_s=0.01)
    tripped = asyncio.Event()
    dog.watch(1.0, tripped.set)
    task = asyncio.create_task(dog.run())
    await asyncio.sleep(0.03)
    assert not tripped.is_set()
    clock.now_ns = 2 * S
    await asyncio.wait_for(tripped.wait(), 1.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
