"""A fault-injecting upstream: a raw asyncio TCP server that speaks HTTP/1.1 byte by byte, so it
can break the protocol in ways a well-behaved server library never would.

Each request is answered by a `Script` (chosen by model name, or by a callable): a normal
vLLM-framed answer, or one fault at a chosen token (a TCP reset, a silent stall, invalid chunked
framing, a single huge SSE line, a redirect naming this server's own address, an error that
echoes the Authorization header it received, an impossible usage figure). Every request is kept
as an `Exchange` with what this server received, generated and sent, for tests to compare.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .frames import CREATED, Frames, prompt_tokens
from .upstream import Behavior

MIB = 1024 * 1024
_LINE_PIECE = b"x" * (64 * 1024)  # the huge line is sent in pieces of this size
_KEEP_LINE_BYTES = 1024  # of a huge line, only this much is kept in Exchange.sent


class Fault(str, enum.Enum):
    NONE = "none"
    RESET = "reset"  # TCP RST (SO_LINGER 0) after `after` tokens
    STALL = "stall"  # half an event after `after` tokens, then silence until the peer leaves
    BAD_FRAMING = "bad_framing"  # a chunk-size line that is not hex after `after` tokens
    HUGE_LINE = "huge_line"  # one `data:` line of `line_bytes` with no newline; then `then`
    IN_BAND_ERROR = "in_band_error"  # vLLM's error event, then [DONE]
    REDIRECT = "redirect"  # `status` (30x) with a Location naming this server's own address
    ECHO_AUTH = "echo_auth"  # a JSON error (`status`) whose body and a header echo the key


@dataclass(frozen=True)
class Script:
    fault: Fault = Fault.NONE
    tokens: int = 8  # completion tokens when max_tokens allows
    after: int = 2  # tokens sent before a mid-stream fault
    pace_s: float = 0.0  # delay between tokens
    headers_delay_s: float = 0.0  # delay before the status line
    tail_delay_s: float = 0.0  # delay between the last event and the end of the body
    # Called right after a stream's status line and headers are handed to the socket, in the
    # same loop step: lets a test act at exactly that moment (a client leaving, say).
    on_headers: Callable[[], None] | None = None
    status: int = 0  # REDIRECT (default 307) and ECHO_AUTH (default 400)
    usage: Mapping[str, int] | None = None  # figures that replace the true usage, e.g. 2**63
    line_bytes: int = 32 * MIB  # HUGE_LINE: bytes after `data: `
    then: str = "done"  # after HUGE_LINE: "done" (blank line, rest of stream), "close", "stall"


@dataclass
class Exchange:
    """One request as this server saw it, and what it did about it."""

    method: str
    target: str  # the request-target exactly as received (latin-1)
    headers: dict[str, str]  # lower-case names; the last value of a repeated header
    body: bytes
    json: Any = None
    script: Script = Script()
    prompt_tokens: int | None = None  # the truth this server counted and reports
    generated: int = 0  # completion tokens sent to the client
    sent: bytearray = field(default_factory=bytearray)  # payload bytes sent (de-chunked)
    sent_bytes: int = 0  # payload bytes sent, huge lines included in full
    finished: bool = False  # the answer was written to its end
    fault_ns: int | None = None  # when the fault was injected
    peer_closed_ns: int | None = None  # when the client (the proxy) closed the connection

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    @property
    def model(self) -> str | None:
        model = self.json.get("model") if isinstance(self.json, dict) else None
        return model if isinstance(model, str) else None


Chooser = Callable[[Exchange], Script]


class FaultUpstream:
    """`scripts`: model name -> Script; `choose` overrides it per request. Models without a
    script get the default Script (a normal answer)."""

    def __init__(
        self,
        scripts: Mapping[str, Script] | None = None,
        *,
        choose: Chooser | None = None,
        flavor: str = "vllm",
    ) -> None:
        self.scripts = dict(scripts or {"sim-llama": Script()})
        self.choose = choose
        self.flavor = flavor
        self.exchanges: list[Exchange] = []
        self.connections_total = 0
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.host, self.port = "127.0.0.1", 0

    @property
    def url(self) -> str:
        """The /v1 base."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await asyncio.start_server(self._connection, host, port, limit=4 * MIB)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # End each connection from the outside so its handler returns on its own; cancel only
        # what is still asleep after that (a cancelled handler is logged by asyncio).
        for writer in list(self._writers):
            writer.transport.abort()
        if self._handlers:
            _, pending = await asyncio.wait(list(self._handlers), timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def posts(self) -> list[Exchange]:
        """The POSTs received (the proxy's own model discovery GETs left out)."""
        return [e for e in self.exchanges if e.method == "POST"]

    def by_request_id(self) -> dict[str, Exchange]:
        return {e.request_id: e for e in self.exchanges if e.request_id is not None}

    @property
    def generated_total(self) -> int:
        return sum(e.generated for e in self.exchanges)

    # -- connection loop ------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.connections_total += 1
        self.open_connections += 1
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open_connections -= 1
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = [*lines[0].split(" ", 2), "", ""][:3]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await _read_body(reader, headers)
        exchange = Exchange(method, target, headers, body)
        try:
            exchange.json = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            exchange.json = None
        self.exchanges.append(exchange)
        path = target.split("?", 1)[0]
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method == "GET" and path == "/v1/models":
            await _send_json(writer, 200, self._models(), exchange)
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            kind = "chat" if path.endswith("chat/completions") else "completion"
            keep = await self._generate(reader, writer, exchange, kind) and keep
        else:
            await _send_json(writer, 404, _error(404, "NotFoundError", "Not Found"), exchange)
        return keep

    def _models(self) -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "created": CREATED, "owned_by": "vllm", "root": name}
            for name in self.scripts
        ]
        return {"object": "list", "data": data}

    # -- answers ----------------------------------------------------------------------------

    async def _generate(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        exchange: Exchange,
        kind: str,
    ) -> bool:
        """One completion; False when the connection cannot be reused."""
        body = exchange.json
        model = exchange.model
        if not isinstance(body, dict) or model is None:
            await _send_json(writer, 400, _error(400, "BadRequestError", "bad body"), exchange)
            return True
        script = self.choose(exchange) if self.choose else self.scripts.get(model, Script())
        exchange.script = script
        if script.headers_delay_s:
            await asyncio.sleep(script.headers_delay_s)
        if script.fault is Fault.REDIRECT:
            location = f"http://{self.address}/internal/v1/chat/completions"
            status = script.status or 307
            head = _head(status, {"location": location, "content-length": "0"})
            writer.write(head)
            await writer.drain()
            exchange.finished = True
            return True
        if script.fault is Fault.ECHO_AUTH:
            auth = exchange.headers.get("authorization", "")
            status = script.status or 400
            error = _error(status, "BadRequestError", f"Invalid credentials `{auth}` for {model}")
            await _send_json(writer, status, error, exchange, {"x-echo-authorization": auth})
            return True
        try:
            prompt = prompt_tokens(body.get("messages", body.get("prompt")))
        except RecursionError:
            await _send_json(writer, 400, _error(400, "BadRequestError", "too deep"), exchange)
            return True
        exchange.prompt_tokens = prompt
        limit = next(
            (
                body[f]
                for f in ("max_tokens", "max_completion_tokens")
                if isinstance(body.get(f), int) and not isinstance(body.get(f), bool)
            ),
            None,
        )
        count = script.tokens if limit is None else min(limit, script.tokens)
        finish = "length" if limit is not None and limit < script.tokens else "stop"
        frames = Frames(self.flavor, body, kind, prompt, Behavior(), continuous=False)
        if body.get("stream") is True:
            return await _Stream(reader, writer, exchange, frames, script).run(count, finish)
        answer = frames.full_body(count, finish)
        answer["usage"] = _usage(prompt, count, script)
        if script.fault is Fault.NONE:
            exchange.generated = count
            await _send_json(writer, 200, answer, exchange)
            return True
        # A fault in a non-streamed answer: half the body, chunked, then the fault.
        stream = _Stream(reader, writer, exchange, frames, script)
        await stream.begin("application/json")
        payload = orjson.dumps(answer)
        await stream.chunk(payload[: len(payload) // 2])
        await stream.fault()
        return False


class _Stream:
    """A chunked event stream for one exchange, and the faults that can break it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        exchange: Exchange,
        frames: Frames,
        script: Script,
    ) -> None:
        self.reader, self.writer, self.exchange = reader, writer, exchange
        self.frames, self.script = frames, script

    async def begin(self, content_type: str) -> None:
        self.writer.write(
            _head(200, {"content-type": content_type, "transfer-encoding": "chunked"})
        )
        if self.script.on_headers is not None:
            self.script.on_headers()
        await self.writer.drain()

    async def chunk(self, payload: bytes, keep: bool = True) -> None:
        self.writer.write(b"%x\r\n%b\r\n" % (len(payload), payload))
        self.exchange.sent_bytes += len(payload)
        if keep:
            self.exchange.sent += payload
        await self.writer.drain()

    async def run(self, count: int, finish: str) -> bool:
        frames, script, exchange = self.frames, self.script, self.exchange
        options = exchange.json.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        await self.begin("text/event-stream; charset=utf-8")
        if frames.kind == "chat":
            await self.chunk(frames.role())
        for i in range(count):
            if i and script.pace_s:
                await asyncio.sleep(script.pace_s)
            if script.fault is not Fault.NONE and i == script.after:
                if script.fault is not Fault.HUGE_LINE:
                    return await self.fault()
                if not await self.huge_line():
                    return False
            await self.chunk(frames.token(i, finish if i == count - 1 else None))
            exchange.generated += 1
        if include_usage:
            usage = _usage(frames.prompt, count, script)
            await self.chunk(b"data: " + _chunk(frames, usage) + b"\n\n")
        await self.chunk(b"data: [DONE]\n\n")
        if script.tail_delay_s:
            await asyncio.sleep(script.tail_delay_s)
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
        exchange.finished = True
        return True

    async def fault(self) -> bool:
        """Inject the script's fault; the connection is never reused after it."""
        fault, exchange, writer = self.script.fault, self.exchange, self.writer
        exchange.fault_ns = time.monotonic_ns()
        if fault is Fault.RESET:
            sock = writer.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends a RST, not a FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if fault is Fault.IN_BAND_ERROR:
            error = _error(500, "InternalServerError", "The engine encountered an error.")
            await self.chunk(b"data: " + orjson.dumps(error) + b"\n\n")
            await self.chunk(b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            exchange.finished = True
            return True
        if fault is Fault.STALL:
            await self.chunk(b'data: {"id":"' + self.frames.id.encode())  # half an event
        elif fault is Fault.BAD_FRAMING:
            writer.write(b"zz\r\ndata: not a chunk\r\n")  # a chunk size that is not hex
            await writer.drain()
        await self.wait_for_peer()
        return False

    async def huge_line(self) -> bool:
        """One `data:` line of `line_bytes` with no newline; True if the stream goes on."""
        self.exchange.fault_ns = time.monotonic_ns()
        await self.chunk(b"data: ")
        left = self.script.line_bytes
        while left > 0:
            piece = _LINE_PIECE[: min(left, len(_LINE_PIECE))]
            if left == self.script.line_bytes:  # keep the line's start only
                self.exchange.sent += piece[:_KEEP_LINE_BYTES]
            await self.chunk(piece, keep=False)
            left -= len(piece)
        if self.script.then == "done":
            await self.chunk(b"\n\n")
            return True
        if self.script.then == "close":
            self.writer.write(b"0\r\n\r\n")
            await self.writer.drain()
            self.exchange.finished = True
            return False
        await self.wait_for_peer()
        return False

    async def wait_for_peer(self) -> None:
        """Stay silent until the client closes the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.exchange.peer_closed_ns = time.monotonic_ns()


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    reason = _REASONS.get(status, "Redirect" if 300 <= status < 400 else "Error")
    lines = [f"HTTP/1.1 {status} {reason}", "server: uvicorn"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_json(
    writer: asyncio.StreamWriter,
    status: int,
    payload: Any,
    exchange: Exchange,
    extra: Mapping[str, str] | None = None,
) -> None:
    body = orjson.dumps(payload)
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        **(extra or {}),
    }
    writer.write(_head(status, headers) + body)
    exchange.sent += body
    exchange.sent_bytes += len(body)
    exchange.finished = True
    await writer.drain()


def _usage(prompt: int, completion: int, script: Script) -> dict[str, int]:
    usage = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    return {**usage, **(script.usage or {})}


def _chunk(frames: Frames, usage: dict[str, int]) -> bytes:
    """The usage-only chunk, framed as vLLM frames it (see Frames.usage)."""
    return orjson.dumps(
        {
            "id": frames.id,
            "object": frames.object,
            "created": CREATED,
            "model": frames.model,
            "choices": [],
            "usage": usage,
        }
    )


def _error(code: int, kind: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
