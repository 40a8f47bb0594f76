"""A watchdog over every relayed upstream body, independent of aiohttp's read timer: a stream
that makes no progress for its upstream's idle timeout (stalled, or stuck in framing aiohttp
cannot parse) is ended by closing its upstream response, and noted as an idle timeout.

One periodic task checks every body in flight; a relay only stamps its progress per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Clock = Callable[[], int]


class Watched:
    """One body in flight."""

    __slots__ = ("close", "idle_ns", "last_ns", "tripped")

    def __init__(self, now_ns: int, idle_ns: int, close: Callable[[], None]) -> None:
        self.last_ns = now_ns
        self.idle_ns = idle_ns
        self.close = close  # ends the upstream response: the relay's read raises
        self.tripped = False


class StreamWatchdog:
    def __init__(self, clock: Clock, period_s: float = 0.25) -> None:
        self._clock = clock
        self._period_s = period_s
        self._watched: set[Watched] = set()

    def watch(self, idle_s: float, close: Callable[[], None]) -> Watched:
        entry = Watched(self._clock(), int(idle_s * 1e9), close)
        self._watched.add(entry)
        return entry

    def forget(self, entry: Watched) -> None:
        self._watched.discard(entry)

    def check(self) -> int:
        """End every body that has been silent past its limit; returns how many."""
        now = self._clock()
        tripped = 0
        for entry in list(self._watched):
            if not entry.tripped and now - entry.last_ns > entry.idle_ns:
                entry.tripped = True
                self._watched.discard(entry)
                entry.close()
                tripped += 1
        return tripped

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            self.check()
