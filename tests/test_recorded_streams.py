"""Recorded real streams (tests/data/*/*.sse) through the SSE scanner: split at every byte
offset they give the same events, and the events' raw bytes are the stream again."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterproxy.sse import SSEScanner

DATA = Path(__file__).parent / "data"
STREAMS = sorted(
    p for p in DATA.glob("*/*.sse") if p.read_bytes().startswith((b"data: ", b"event: "))
)


@pytest.mark.parametrize("path", STREAMS, ids=[f"{p.parent.name}/{p.stem}" for p in STREAMS])
def test_recorded_stream_splits_anywhere(path: Path) -> None:
    stream = path.read_bytes()
    scanner = SSEScanner()
    whole = scanner.feed(stream) + scanner.flush()
    assert all(event.complete for event in whole)
    assert b"".join(event.raw for event in whole) == stream
    for cut in range(len(stream) + 1):
        scanner = SSEScanner()
        events = scanner.feed(stream[:cut]) + scanner.feed(stream[cut:]) + scanner.flush()
        assert events == whole, f"split at byte {cut}"
