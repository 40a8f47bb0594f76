"""A sans-IO scanner for Server-Sent Events: feed it bytes, get whole events back.

It knows nothing of OpenAI. Each event keeps its raw bytes (terminator included) so a caller
can pass the stream through untouched and still see the events beside it.
"""

from __future__ import annotations

from typing import NamedTuple


class Event(NamedTuple):
    """One event (a named tuple: one is made for every event of every stream, and a tuple is
    made in half the time of a frozen dataclass)."""

    raw: bytes  # exactly the bytes of this event on the wire, blank line included
    data: bytes  # the data lines joined with b"\n"; b"" when the event has none
    name: bytes | None = None  # the `event:` field, if any
    complete: bool = True  # False for bytes left over at end of stream with no blank line


def _parse(raw: bytes, complete: bool) -> Event:
    # Fast path: the one-line `data: ...\n\n` event that OpenAI-compatible servers send.
    if complete and raw.startswith(b"data: ") and raw.find(b"\n", 6) == len(raw) - 2:
        return Event(raw=raw, data=raw[6:-2])
    data: list[bytes] = []
    name: bytes | None = None
    for line in raw.splitlines():
        if line.startswith(b"data"):
            value = line[4:]
            if value.startswith(b":"):
                value = value[1:]
                data.append(value[1:] if value.startswith(b" ") else value)
            elif not value:
                data.append(b"")
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return Event(raw=raw, data=b"\n".join(data), name=name, complete=complete)


class EventTooLarge(ValueError):
    """An event (or a line without its end) grew past the scanner's `max_event_bytes`."""


class SSEScanner:
    """Splits a byte stream into events at blank lines (LF, CRLF or CR line endings).

    An unfinished event is kept in one growing buffer that is searched only where new bytes
    arrived, so an event delivered in many small chunks costs linear time, and its size is
    visible (`pending`) so the caller can bound it.
    """

    __slots__ = ("_buffer", "_crlf", "_limit", "_overflow", "_searched")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buffer = bytearray()
        self._searched = 0  # bytes of the buffer already known to hold no terminator
        self._crlf = False  # a CR has been seen: the slow terminator search applies
        self._limit = max_event_bytes
        self._overflow = False

    def feed(self, chunk: bytes) -> list[Event]:
        """The events this chunk completes. Raises EventTooLarge once an unfinished event
        holds more than `max_event_bytes` (memory stays at that bound); events completed in
        the same chunk are returned first, and the next call raises."""
        if self._overflow:
            raise EventTooLarge(f"an event is larger than {self._limit:,} bytes")
        limit = self._limit
        # The common case first: a chunk that is exactly one `data: ...\n\n` event (vLLM and
        # OpenAI write one per token), nothing held from before: what `_split` would find.
        if (
            not self._buffer
            and not self._crlf
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n", 6) == len(chunk) - 2
            and chunk.endswith(b"\n")
            and b"\r" not in chunk
            and (limit is None or len(chunk) <= limit)
        ):
            return [Event(chunk, chunk[6:-2])]
        events = self._split(chunk)
        if limit is None:
            return events
        for i, event in enumerate(events):
            if len(event.raw) > limit:  # whole, but too large all the same
                del events[i:]
                self._overflow = True
                break
        if len(self._buffer) > limit:
            del self._buffer[limit:]
            self._overflow = True
        if self._overflow and not events:
            raise EventTooLarge(f"an event is larger than {limit:,} bytes")
        return events

    def _split(self, chunk: bytes) -> list[Event]:
        if not self._buffer:
            if b"\r" in chunk:
                self._crlf = True
            if not self._crlf:  # the common case (vLLM, trtllm-serve, OpenAI): LF only
                events, start = _split_lf(chunk, 0)
                if start < len(chunk):
                    self._buffer += chunk[start:]
                    self._searched = max(len(chunk) - start - 1, 0)
                return events
        elif b"\r" in chunk:
            self._crlf = True
        buffer = self._buffer
        buffer += chunk
        # A terminator may straddle the old end: look back far enough to see it whole.
        since = max(self._searched - 3, 0)
        if self._crlf:
            events, start = _split_any(buffer, since)
        else:
            events, start = _split_lf(buffer, since)
        if start:
            del buffer[:start]
        self._searched = max(len(buffer) - 1, 0)
        return events

    def flush(self) -> list[Event]:
        """At end of stream: whatever was left without a terminating blank line."""
        if self._overflow:
            raise EventTooLarge(f"an event is larger than {self._limit:,} bytes")
        rest = bytes(self._buffer)
        self._buffer = bytearray()
        self._searched = 0
        if not rest:
            return []
        # A CR held back as the possible first half of a CRLF is a line end once the stream
        # has ended: if it closes a blank line, the event is whole.
        complete = rest.endswith(b"\r") and rest[:-1].endswith((b"\r", b"\n"))
        return [_parse(rest, complete)]

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def take_whole(
        self, chunk: bytes, unless: tuple[bytes, ...] = ()
    ) -> tuple[bytes, int, bool] | None:
        """`feed` without an event object for each, for a chunk whose events are all whole
        one-line `data: <payload>` events (what engines send, cut anywhere when the reader falls
        behind): the bytes of the events it completes (the held bytes they began with
        included), how many, and whether it stopped short. It stops at the first event holding
        one of `unless`: from there on the bytes stay held, and `feed(b"")` splits them. The
        rest is held as `feed` holds it. None, with nothing changed, for any other chunk: `feed`
        it."""
        if self._crlf or self._overflow or b"\r" in chunk:
            return None
        buffer, limit = self._buffer, self._limit
        end = chunk.rfind(b"\n\n") + 2
        if end < 2:  # nothing completes, unless a blank line straddles the two
            if (buffer.endswith(b"\n") and chunk.startswith(b"\n")) or (
                limit is not None and len(buffer) + len(chunk) > limit
            ):
                return None
            buffer += chunk
            self._searched = max(len(buffer) - 1, 0)
            return b"", 0, False
        done = bytes(buffer) + chunk[:end] if buffer else chunk[:end]
        rest = chunk[end:]
        count = whole_data_events(done)
        if not count or (limit is not None and (len(done) > limit or len(rest) > limit)):
            return None
        marked = [at for mark in unless if (at := done.find(mark)) >= 0]
        buffer.clear()
        if not marked:
            buffer += rest
            self._searched = max(len(rest) - 1, 0)
            return done, count, False
        start = done.rfind(b"\n\n", 0, min(marked))
        start = 0 if start < 0 else start + 2  # where the first marked event begins
        buffer += done[start:]
        buffer += rest
        self._searched = 0
        done = done[:start]
        return done, done.count(b"\n\n"), True


def whole_events(done: bytes) -> list[Event]:
    """The events of bytes `take_whole` returned (for a caller that needs them after all)."""
    return [Event(b"data: " + data + b"\n\n", data) for data in done[6:-2].split(b"\n\ndata: ")]


def whole_data_events(chunk: bytes) -> int:
    """The number of `data: <payload>\\n\\n` events `chunk` consists of (payloads not empty, no
    other lines, no CR), else 0. Counted, not split: every newline must belong to one of the
    blank-line terminators, and each terminator but the last be followed by `data: `."""
    if not chunk.startswith(b"data: ") or not chunk.endswith(b"\n\n") or b"\r" in chunk:
        return 0
    if chunk.find(b"\n") == len(chunk) - 2:  # one event (as engines write them)
        return 1 if len(chunk) > 8 else 0
    events = chunk.count(b"\n\n")
    if (
        chunk.count(b"\n") != 2 * events
        or chunk.count(b"\n\ndata: ") != events - 1
        or b"data: \n" in chunk
    ):
        return 0
    return events


def _split_lf(buffer: bytes | bytearray, since: int) -> tuple[list[Event], int]:
    """Events ended by `\\n\\n`; returns them and where the unfinished rest starts."""
    events: list[Event] = []
    start = 0
    search = since
    while True:
        end = buffer.find(b"\n\n", search)
        if end < 0:
            return events, start
        events.append(_parse(bytes(buffer[start : end + 2]), True))
        start = search = end + 2


def _split_any(buffer: bytearray, since: int) -> tuple[list[Event], int]:
    events: list[Event] = []
    start = 0
    search = since
    while True:
        end, size = _blank_line(buffer, search)
        if end < 0:
            return events, start
        events.append(_parse(bytes(buffer[start : end + size]), True))
        start = search = end + size


def _blank_line(buffer: bytes | bytearray, start: int) -> tuple[int, int]:
    """Position and size of the first blank-line terminator at or after `start`.

    A lone CR at the very end of the buffer may be the first half of a CRLF, so it is not
    taken as a line end until the next byte arrives.
    """
    i = start
    n = len(buffer)
    while i < n:
        c = buffer[i]
        if c == 0x0A:  # LF ends a line
            line_end = i + 1
        elif c == 0x0D:  # CR or CRLF ends a line
            if i + 1 >= n:
                return -1, 0
            line_end = i + 2 if buffer[i + 1] == 0x0A else i + 1
        else:
            i += 1
            continue
        # A line just ended at line_end; is the next line empty?
        if line_end >= n:
            return -1, 0
        nxt = buffer[line_end]
        if nxt == 0x0A:
            return i, line_end + 1 - i
        if nxt == 0x0D:
            if line_end + 1 >= n:
                return -1, 0
            size = 2 if buffer[line_end + 1] == 0x0A else 1
            return i, line_end + size - i
        i = line_end
    return -1, 0
