"""A simulated OpenAI-compatible inference server that speaks vLLM's bytes (or trtllm-serve's).

Chunks are framed exactly as vLLM frames them (compact pydantic JSON, `data: ...\\n\\n`, a role
chunk, one chunk per token, the usage-only chunk with empty `choices`, `data: [DONE]`), and each
model name selects a Behavior: token count, pacing, usage reporting and failure mode.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

CREATED = 1_730_000_000
# Each of these is one token in cl100k and o200k, so tiktoken estimates match the fake's counts.
WORDS = (
    " the",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " lazy",
    " dog",
    " and",
    " runs",
    " far",
    " away",
)
FAILURES = (
    "http_500_html",
    "http_400",
    "http_401",
    "hang",
    "hang_mid",
    "reset",
    "in_band_error",
    "eof",
)


@dataclass(frozen=True)
class Behavior:
    tokens: int = 8  # completion tokens when max_tokens allows
    pace_s: float = 0.0  # delay between tokens
    first_token_s: float = 0.0  # delay before the first token (prefill)
    usage: bool = True  # False: never report usage, whatever the client asks
    cached_tokens: int | None = None  # prompt_tokens_details.cached_tokens
    reasoning_tokens: int | None = None  # completion_tokens_details.reasoning_tokens
    failure: str | None = None  # one of FAILURES
    fail_after: int = 2  # tokens streamed before a mid-stream failure


@dataclass
class Seen:
    """What the fake received: for assertions on forwarding and cancellation."""

    path: str
    headers: Mapping[str, str]
    body: Any
    finished_ns: int | None = None  # the handler ended (response complete or cancelled)
    cancelled: bool = False  # the client (the proxy) closed the connection mid-response
    prompt_tokens: int | None = None  # the truth: what this server counted and reports
    generated: int = 0  # completion tokens generated (and sent) so far


@dataclass
class FakeUpstream:
    flavor: str = "vllm"  # vllm | trtllm
    models: dict[str, Behavior] = field(default_factory=lambda: {"sim-llama": Behavior()})
    seen: list[Seen] = field(default_factory=list)
    keep_seen: bool = True  # False for long benchmark runs: remember nothing
    requests_total: int = 0  # the truth, kept even when `seen` is not
    prompt_tokens_total: int = 0
    generated_total: int = 0

    def behavior(self, model: str) -> Behavior | None:
        return self.models.get(model)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_route("*", "/v1/{tail:.*}", self._echo)
        return app

    # -- endpoints ------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": CREATED,
                "owned_by": "vllm",
                "root": name,
                "parent": None,
                "max_model_len": 8192,
            }
            for name in self.models
        ]
        return _json({"object": "list", "data": data})

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(Seen(request.path, CIMultiDict(request.headers), body))
        return _json({"path": request.path_qs, "method": request.method, "bytes": len(body)})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "response")

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, behavior, seen = await self._accept(request)
        if isinstance(behavior, web.StreamResponse):
            return behavior
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and not _is_ids(inputs) else [inputs]
        prompt = sum(_prompt_tokens(item) for item in items)
        data = [
            {"index": i, "object": "embedding", "embedding": [0.0125 * (i + 1)] * 8}
            for i in range(len(items))
        ]
        seen.finished_ns = time.monotonic_ns()
        return _json(
            {
                "id": _id("embd", body),
                "object": "list",
                "created": CREATED,
                "model": body["model"],
                "data": data,
                "usage": {
                    "prompt_tokens": prompt,
                    "total_tokens": prompt,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )

    # -- generation -----------------------------------------------------------------------

    async def _accept(self, request: web.Request) -> tuple[dict[str, Any], Any, Seen]:
        raw = await request.read()
        body = orjson.loads(raw)
        seen = Seen(request.path, CIMultiDict(request.headers), body)
        self.requests_total += 1
        if self.keep_seen:
            self.seen.append(seen)
        behavior = self.behavior(body.get("model", ""))
        if behavior is None:
            return (
                body,
                _error(404, "NotFoundError", f"The model `{body.get('model')}` does not exist."),
                seen,
            )
        if behavior.failure == "http_500_html":
            return (
                body,
                web.Response(
                    status=500,
                    content_type="text/html",
                    text="<html><body><h1>500 Internal Server Error</h1></body></html>",
                ),
                seen,
            )
        if behavior.failure == "http_400":
            return (
                body,
                _error(
                    400, "BadRequestError", "This model's maximum context length is 8192 tokens."
                ),
                seen,
            )
        if behavior.failure == "http_401":
            return (
                body,
                _error(
                    401,
                    "AuthenticationError",
                    "Incorrect API key provided: "
                    f"{request.headers.get('Authorization', '')[7:13]}****",
                ),
                seen,
            )
        if behavior.failure == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen.cancelled, seen.finished_ns = True, time.monotonic_ns()
                raise
        return body, behavior, seen

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        body, behavior, seen = await self._accept(request)
        if isinstance(behavior, web.StreamResponse):
            return behavior
        limit = (
            body.get("max_tokens")
            or body.get("max_completion_tokens")
            or body.get("max_output_tokens")
        )
        count = behavior.tokens if not isinstance(limit, int) else min(limit, behavior.tokens)
        finish = "length" if isinstance(limit, int) and limit < behavior.tokens else "stop"
        prompt = _prompt_tokens(body.get("messages", body.get("prompt", body.get("input"))))
        seen.prompt_tokens = prompt
        self.prompt_tokens_total += prompt
        try:
            if body.get("stream") is True:
                return await self._stream(request, seen, behavior, kind, count, finish)
            if behavior.first_token_s or behavior.pace_s:
                await asyncio.sleep(behavior.first_token_s + behavior.pace_s * count)
            seen.generated = count
            self.generated_total += count
            return _json(_full_body(body, behavior, kind, count, finish, prompt))
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        finally:
            seen.finished_ns = time.monotonic_ns()

    async def _stream(
        self,
        request: web.Request,
        seen: Seen,
        behavior: Behavior,
        kind: str,
        count: int,
        finish: str,
    ) -> web.StreamResponse:
        body, prompt = seen.body, seen.prompt_tokens or 0
        out = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await out.prepare(request)
        options = body.get("stream_options") or {}
        include_usage = behavior.usage and bool(options.get("include_usage"))
        continuous = include_usage and bool(options.get("continuous_usage_stats"))
        frames = _Frames(self.flavor, body, kind, prompt, behavior, continuous)
        if kind == "response":
            return await self._stream_response(out, frames, behavior, count, seen)
        if kind == "chat":
            await out.write(frames.role())
        if behavior.first_token_s:
            await asyncio.sleep(behavior.first_token_s)
        for i in range(count):
            if i and behavior.pace_s:
                await asyncio.sleep(behavior.pace_s)
            if behavior.failure and i == behavior.fail_after:
                return await self._fail_stream(request, out, behavior)
            await out.write(frames.token(i, finish if i == count - 1 else None))
            seen.generated += 1
            self.generated_total += 1
        if include_usage:
            await out.write(frames.usage(count))
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def _fail_stream(
        self, request: web.Request, out: web.StreamResponse, behavior: Behavior
    ) -> web.StreamResponse:
        if behavior.failure == "reset":
            assert request.transport is not None
            request.transport.abort()
        elif behavior.failure == "hang_mid":
            await asyncio.sleep(3600)
        elif behavior.failure == "in_band_error":
            error = {
                "error": {
                    "message": "The engine encountered an error (EngineDeadError).",
                    "type": "InternalServerError",
                    "param": None,
                    "code": 500,
                }
            }
            await out.write(b"data: " + orjson.dumps(error) + b"\n\n")
            if self.flavor == "vllm":  # vLLM ends every stream with [DONE]; trtllm-serve doesn't
                await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
        else:  # "eof": the stream just ends, as trtllm-serve does on errors
            await out.write_eof()
        return out

    async def _stream_response(
        self,
        out: web.StreamResponse,
        frames: _Frames,
        behavior: Behavior,
        count: int,
        seen: Seen,
    ) -> web.StreamResponse:
        await out.write(frames.event("response.created", frames.response("in_progress", 0, None)))
        if behavior.first_token_s:
            await asyncio.sleep(behavior.first_token_s)
        for i in range(count):
            if i and behavior.pace_s:
                await asyncio.sleep(behavior.pace_s)
            await out.write(
                frames.event(
                    "response.output_text.delta",
                    {
                        "type": "response.output_text.delta",
                        "content_index": 0,
                        "delta": WORDS[i % len(WORDS)],
                        "item_id": frames.item_id,
                        "output_index": 0,
                        "sequence_number": i + 1,
                        "logprobs": [],
                    },
                )
            )
            seen.generated += 1
            self.generated_total += 1
        usage = frames.response_usage(count) if behavior.usage else None
        await out.write(
            frames.event("response.completed", frames.response("completed", count, usage))
        )
        await out.write_eof()
        return out


class _Frames:
    """Serializes chunks the way the flavor's server does."""

    def __init__(
        self,
        flavor: str,
        body: dict[str, Any],
        kind: str,
        prompt: int,
        behavior: Behavior,
        continuous: bool,
    ) -> None:
        self.flavor, self.kind, self.prompt, self.behavior = flavor, kind, prompt, behavior
        self.continuous = continuous
        self.model = body["model"]
        self.id = _id({"chat": "chatcmpl", "completion": "cmpl", "response": "resp"}[kind], body)
        self.item_id = "msg_" + self.id[-16:]
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": CREATED,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return orjson.dumps(chunk)

    def role(self) -> bytes:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        usage = self._usage(0, details=False) if self.continuous else None
        # trtllm-serve's role chunk carries a stray space before the blank line.
        tail = b" \n\n" if self.flavor == "trtllm" else b"\n\n"
        return b"data: " + self._chunk([choice], usage) + tail

    def token(self, i: int, finish: str | None) -> bytes:
        word = WORDS[i % len(WORDS)]
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": word},
                "logprobs": None,
                "finish_reason": finish,
                "token_ids": None,
            }
        else:
            choice = {
                "index": 0,
                "text": word,
                "logprobs": None,
                "finish_reason": finish,
                "token_ids": None,
            }
        if finish is not None:
            choice["stop_reason"] = None
        usage = self._usage(i + 1, details=False) if self.continuous else None
        return b"data: " + self._chunk([choice], usage) + b"\n\n"

    def usage(self, completion: int) -> bytes:
        return b"data: " + self._chunk([], self._usage(completion, details=True)) + b"\n\n"

    def _usage(self, completion: int, *, details: bool) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt,
            "total_tokens": self.prompt + completion,
            "completion_tokens": completion,
        }
        if details and self.behavior.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {
                "reasoning_tokens": min(completion, self.behavior.reasoning_tokens)
            }
        if details and self.behavior.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.behavior.cached_tokens}
        return usage

    def event(self, name: str, payload: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def response(self, status: str, count: int, usage: Any) -> dict[str, Any]:
        text = "".join(WORDS[i % len(WORDS)] for i in range(count))
        output = (
            [
                {
                    "id": self.item_id,
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [
                        {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
                    ],
                }
            ]
            if status == "completed"
            else []
        )
        return {
            "type": f"response.{'created' if status == 'in_progress' else status}",
            "sequence_number": 0 if status == "in_progress" else count + 1,
            "response": {
                "id": self.id,
                "object": "response",
                "created_at": CREATED,
                "model": self.model,
                "status": status,
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": usage,
            },
        }

    def response_usage(self, count: int) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.behavior.cached_tokens or 0},
            "output_tokens": count,
            "output_tokens_details": {"reasoning_tokens": self.behavior.reasoning_tokens or 0},
            "total_tokens": self.prompt + count,
        }


def _full_body(
    body: dict[str, Any], behavior: Behavior, kind: str, count: int, finish: str, prompt: int
) -> dict[str, Any]:
    frames = _Frames("vllm", body, kind, prompt, behavior, False)
    text = "".join(WORDS[i % len(WORDS)] for i in range(count))
    usage = frames._usage(count, details=True) if behavior.usage else None
    if kind == "response":
        result = frames.response(
            "completed", count, frames.response_usage(count) if behavior.usage else None
        )
        response: dict[str, Any] = result["response"]
        return response
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            },
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        obj = "text_completion"
    out: dict[str, Any] = {
        "id": frames.id,
        "object": obj,
        "created": CREATED,
        "model": body["model"],
        "choices": [choice],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def _prompt_tokens(value: Any) -> int:
    """The fake's own prompt count: words plus per-message framing. Deterministic, not tiktoken."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.split()) + 1
    if isinstance(value, list):
        if _is_ids(value):
            return len(value)
        return sum(_prompt_tokens(v) for v in value) + 2
    if isinstance(value, dict):
        return _prompt_tokens(value.get("content")) + 3
    return 1


def _is_ids(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, int) for v in value)


def _id(prefix: str, body: dict[str, Any]) -> str:
    # Deterministic (vLLM's are random) so streams can be compared byte for byte; options the
    # proxy may add are left out of the hash.
    key = {k: v for k, v in body.items() if k != "stream_options"}
    digest = hashlib.sha256(orjson.dumps(key, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}-{digest[:32]}"


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _error(status: int, kind: str, message: str) -> web.Response:
    return _json(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}, status
    )


def _cli() -> None:
    parser = argparse.ArgumentParser(description="Run a simulated vLLM server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--flavor", default="vllm", choices=("vllm", "trtllm"))
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="NAME[:TOKENS[:PACE_MS]] (repeatable); default sim-llama",
    )
    parser.add_argument("--tokens", type=int, default=64, help="default tokens per answer")
    parser.add_argument("--pace-ms", type=float, default=0.0, help="default ms between tokens")
    args = parser.parse_args()
    models: dict[str, Behavior] = {}
    for spec in args.model or ["sim-llama"]:
        name, *rest = spec.split(":")
        tokens = int(rest[0]) if rest else args.tokens
        pace_ms = float(rest[1]) if len(rest) > 1 else args.pace_ms
        models[name] = Behavior(tokens=tokens, pace_s=pace_ms / 1000)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(
        FakeUpstream(args.flavor, models, keep_seen=False).app(),
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        access_log=None,
        print=None,
    )


def with_failure(behavior: Behavior, failure: str, after: int = 2) -> Behavior:
    if failure not in FAILURES:
        raise ValueError(f"unknown failure {failure!r}; expected one of {', '.join(FAILURES)}")
    return replace(behavior, failure=failure, fail_after=after)


if __name__ == "__main__":
    _cli()
