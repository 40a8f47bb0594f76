"""A simulated GPU whose power follows a live upstream's load, for end-to-end checks without a
GPU: idle power, plus an engine floor while any request is in flight, plus power per request in
flight that grows with its prompt (its context is read at every step). Requests are seen by an
aiohttp middleware on the upstream's app; the cumulative energy at any time is exact
(integrated from the recorded intervals), so a fake NVML reading it from another thread gets a
consistent counter.

    gpu = LoadDrivenGpu(); app = fake.app(); gpu.watch(app)
    fake_nvml = FakeNvml({"0": gpu.energy_mj})
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class LoadDrivenGpu:
    idle_w: float = 70.0
    floor_w: float = 150.0
    request_w: float = 20.0
    request_w_per_kbyte: float = 2.0
    clock: Callable[[], float] = time.monotonic
    _spans: list[tuple[float, float | None, float]] = field(default_factory=list)  # start, end, W
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _origin: float = field(default=0.0)

    def __post_init__(self) -> None:
        self._origin = self.clock()

    def watch(self, app: web.Application) -> None:
        """Record every request the app serves (before the app starts)."""

        @web.middleware
        async def record(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.method != "POST":
                return await handler(request)
            body = await request.read()
            with self._lock:
                index = len(self._spans)
                watts = self.request_w + self.request_w_per_kbyte * len(body) / 1000
                self._spans.append((self.clock(), None, watts))
            try:
                return await handler(request)
            finally:
                with self._lock:
                    start, _, watts = self._spans[index]
                    self._spans[index] = (start, self.clock(), watts)

        app.middlewares.append(record)

    def energy_mj(self, t: float) -> float:
        """The board's true cumulative energy at time t (mJ since the GPU was created)."""
        with self._lock:
            spans = list(self._spans)
        total = self.idle_w * max(t - self._origin, 0.0) * 1000
        busy: list[tuple[float, float]] = []
        for start, end, watts in spans:
            if start >= t:
                continue
            stop = min(end if end is not None else t, t)
            total += watts * (stop - start) * 1000
            busy.append((start, stop))
        busy.sort()
        covered, until = 0.0, float("-inf")
        for start, stop in busy:  # the floor counts once while anything is in flight
            if stop > until:
                covered += stop - max(start, until)
                until = stop
        return total + self.floor_w * covered * 1000
