"""The one sampler thread: reads the source every interval and hands readings to the event
loop. NVML calls never run on the loop (NVML takes a driver-wide lock)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from .sources import EnergyError, Reading, Source

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.1  # at most 10 Hz per GPU


class Sampler:
    def __init__(
        self,
        source: Source,
        interval_s: float,
        loop: asyncio.AbstractEventLoop,
        on_readings: Callable[[list[Reading]], None],
        on_error: Callable[[EnergyError], None],
    ) -> None:
        self._source, self._interval = source, max(interval_s, MIN_INTERVAL_S)
        self._loop, self._on_readings, self._on_error = loop, on_readings, on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="energy-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                readings = self._source.read()
            except EnergyError as exc:
                self._post(self._on_error, exc)
            except Exception as exc:  # a source bug must not kill the thread silently
                log.exception("energy source %s failed", self._source.name)
                self._post(self._on_error, EnergyError(str(exc)))
            else:
                self._post(self._on_readings, readings)
            self._stop.wait(self._interval)

    def _post(self, callback: Callable[..., None], arg: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the loop is closing
            self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._source.close()
