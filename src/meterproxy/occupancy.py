"""GPU time per request, until measured energy weights exist: each upstream's wall time is split
evenly among the requests in flight on it. Pure, O(1) per event.

The running integral S(t) = ∫ dt / n(t) over busy time gives a request in flight from t0 to t1
exactly S(t1) - S(t0) seconds: its share of every interval it overlapped.
"""

from __future__ import annotations


class Occupancy:
    __slots__ = ("_inflight", "_last_ns", "_share_ns")

    def __init__(self) -> None:
        self._inflight = 0
        self._last_ns = 0
        self._share_ns = 0.0  # S(t) in nanoseconds

    def _advance(self, now_ns: int) -> None:
        if self._inflight:
            self._share_ns += (now_ns - self._last_ns) / self._inflight
        self._last_ns = now_ns

    def begin(self, now_ns: int) -> float:
        """A request enters; returns the mark to hand back to `end`."""
        self._advance(now_ns)
        self._inflight += 1
        return self._share_ns

    def end(self, now_ns: int, mark: float) -> float:
        """A request leaves; returns its share of wall time in seconds."""
        self._advance(now_ns)
        self._inflight -= 1
        return (self._share_ns - mark) / 1e9
