"""A simulated OpenAI-compatible inference server that speaks vLLM's bytes, or another
server's: trtllm-serve's, OpenAI's hosted API (sim/hosted.py), LiteLLM's proxy (sim/litellm.py).

Chunks are framed exactly as vLLM frames them (compact pydantic JSON, `data: ...\\n\\n`, a role
chunk, one chunk per token and choice, the usage-only chunk with empty `choices`,
`data: [DONE]`), and each model name selects a Behavior: token count, pacing, usage reporting,
failure mode, and optionally its own flavor. The vLLM flavor also serves vLLM's own token
counters at /metrics (sim/engine_metrics.py), counting what it generated.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .engine_metrics import CONTENT_TYPE, TRTLLM, VLLM, VllmCounters
from .frames import CREATED, Frames, is_ids, make_id, prompt_tokens
from .hosted import HostedFrames
from .litellm import LiteLLMFrames

# Each flavor's serializer: select one for a whole server (FakeUpstream.flavor) or per model
# name (Behavior.flavor).
FLAVORS: dict[str, type[Frames]] = {
    "vllm": Frames,
    "trtllm": Frames,
    "openai": HostedFrames,
    "litellm": LiteLLMFrames,
}

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
    flavor: str | None = None  # one of FLAVORS: this model's server, else the FakeUpstream's


@dataclass
class Seen:
    """What the fake received: for assertions on forwarding and cancellation."""

    path: str
    headers: Mapping[str, str]
    body: Any
    finished_ns: int | None = None  # the handler ended (response complete or cancelled)
    cancelled: bool = False  # the client (the proxy) closed the connection mid-response
    prompt_tokens: int | None = None  # the truth: what this server counted and reports
    generated: int = 0  # completion tokens generated (and sent) so far, all choices
    choices: int = 1  # `n`
    finished_choices: int = 0  # choices that ran to their end (stop or length)


@dataclass
class FakeUpstream:
    flavor: str = "vllm"  # one of FLAVORS
    models: dict[str, Behavior] = field(default_factory=lambda: {"sim-llama": Behavior()})
    seen: list[Seen] = field(default_factory=list)
    keep_seen: bool = True  # False for long benchmark runs: remember nothing
    requests_total: int = 0  # the truth, kept even when `seen` is not
    prompt_tokens_total: int = 0
    generated_total: int = 0
    engine: VllmCounters = field(default_factory=VllmCounters)  # vLLM's own counters

    def __post_init__(self) -> None:
        for name, behavior in self.models.items():
            if (behavior.flavor or self.flavor) not in FLAVORS:
                raise ValueError(f"model {name!r}: unknown flavor; expected one of {list(FLAVORS)}")
            self.engine.serve(name)

    def behavior(self, model: str) -> Behavior | None:
        return self.models.get(model)

    def frames_class(self, behavior: Behavior) -> type[Frames]:
        return FLAVORS[behavior.flavor or self.flavor]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # engines take long prompts
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        if self.flavor == "vllm":
            app.router.add_get("/metrics", self._metrics)
        elif self.flavor == "trtllm":  # trtllm-serve's Prometheus counters (TensorRT-LLM >= 1.1)
            app.router.add_get("/prometheus/metrics", self._metrics)
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

    async def _metrics(self, request: web.Request) -> web.Response:
        dialect = TRTLLM if self.flavor == "trtllm" else VLLM
        return web.Response(
            body=self.engine.render(dialect).encode(), headers={"Content-Type": CONTENT_TYPE}
        )

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
        items = inputs if isinstance(inputs, list) and not is_ids(inputs) else [inputs]
        prompt = sum(prompt_tokens(item) for item in items)
        data = [
            {"index": i, "object": "embedding", "embedding": [0.0125 * (i + 1)] * 8}
            for i in range(len(items))
        ]
        seen.finished_ns = time.monotonic_ns()
        return _json(
            {
                "id": make_id("embd", body),
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
        failure = behavior.failure
        if failure == "in_band_error" and behavior.fail_after == 0 and body.get("stream") is True:
            failure = "in_band_error_first"
        answered = self.frames_class(behavior).http_error(
            failure or "", body["model"], request.headers.get("Authorization", "")
        )
        if answered is not None:
            status, content_type, payload = answered
            headers = {"Content-Type": content_type, **self._headers(behavior, raw)}
            return body, web.Response(status=status, body=payload, headers=headers), seen
        if failure == "http_500_html":
            return (
                body,
                web.Response(
                    status=500,
                    content_type="text/html",
                    text="<html><body><h1>500 Internal Server Error</h1></body></html>",
                ),
                seen,
            )
        if failure == "http_400":
            return (
                body,
                _error(
                    400, "BadRequestError", "This model's maximum context length is 8192 tokens."
                ),
                seen,
            )
        if failure == "http_401":
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
        if failure == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen.cancelled, seen.finished_ns = True, time.monotonic_ns()
                raise
        return body, behavior, seen

    def _headers(self, behavior: Behavior, raw: bytes) -> dict[str, str]:
        return self.frames_class(behavior).headers(raw + str(self.requests_total).encode())

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
        prompt = prompt_tokens(self.frames_class(behavior).engine_input(body))
        n = body.get("n")
        seen.choices = n if isinstance(n, int) and n > 1 and kind != "response" else 1
        seen.prompt_tokens = prompt
        self.prompt_tokens_total += prompt
        options = body.get("stream_options") or {}
        include_usage = behavior.usage and bool(options.get("include_usage"))
        continuous = include_usage and bool(options.get("continuous_usage_stats"))
        frames = self.frames_class(behavior)(
            behavior.flavor or self.flavor, body, kind, prompt, behavior, continuous, include_usage
        )
        try:
            if body.get("stream") is True:
                return await self._stream(request, seen, behavior, frames, count, finish)
            if behavior.first_token_s or behavior.pace_s:
                await asyncio.sleep(behavior.first_token_s + behavior.pace_s * count)
            for _ in range(seen.choices if count else 0):
                self._token(seen, 0, prompt)
                self._generated(seen, count - 1)
            self._finished(seen, finish, seen.choices)
            headers = {"Content-Type": "application/json", **self._headers(behavior, b"")}
            payload = frames.dumps(frames.full_body(count, finish, seen.choices))
            return web.Response(body=payload, headers=headers)
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        finally:
            seen.finished_ns = time.monotonic_ns()
            # A request that did not run to its end was aborted (client gone, or a fault).
            self._finished(seen, "abort", seen.choices - seen.finished_choices)

    # -- the truth, and vLLM's counters of it --------------------------------------------

    def _token(self, seen: Seen, i: int, prompt: int) -> None:
        if i == 0:  # vLLM counts a choice's prompt once its first token is out
            self.engine.prefilled(seen.body["model"], prompt)
        self._generated(seen, 1)

    def _generated(self, seen: Seen, tokens: int) -> None:
        if tokens > 0:
            seen.generated += tokens
            self.generated_total += tokens
            self.engine.generated(seen.body["model"], tokens)

    def _finished(self, seen: Seen, reason: str, choices: int) -> None:
        if choices > 0:
            self.engine.finished(seen.body["model"], reason, choices)
            seen.finished_choices += choices

    # -- streams --------------------------------------------------------------------------

    async def _stream(
        self,
        request: web.Request,
        seen: Seen,
        behavior: Behavior,
        frames: Frames,
        count: int,
        finish: str,
    ) -> web.StreamResponse:
        prompt, n = seen.prompt_tokens or 0, seen.choices
        out = web.StreamResponse(
            headers={
                "content-type": "text/event-stream; charset=utf-8",
                **self._headers(behavior, b""),
            }
        )
        await out.prepare(request)
        if frames.kind == "response":
            return await self._stream_response(request, out, frames, behavior, count, seen)
        if frames.kind == "chat":
            for index in range(n):
                await _write(out, frames.role(index))
        if behavior.first_token_s:
            await asyncio.sleep(behavior.first_token_s)
        for i in range(count):
            if i and behavior.pace_s:
                await asyncio.sleep(behavior.pace_s)
            if behavior.failure and i == behavior.fail_after:
                return await self._fail_stream(request, out, behavior, frames, seen)
            for index in range(n):
                await _write(out, frames.token(i, finish if i == count - 1 else None, index))
                self._token(seen, i, prompt)
        for index in range(n):
            await _write(out, frames.finish(finish, index))
        self._finished(seen, finish, n)
        if frames.include_usage:
            await out.write(frames.usage(n * count))
        await out.write(frames.done())
        await out.write_eof()
        return out

    async def _fail_stream(
        self,
        request: web.Request,
        out: web.StreamResponse,
        behavior: Behavior,
        frames: Frames,
        seen: Seen,
    ) -> web.StreamResponse:
        if behavior.failure == "reset":
            if isinstance(frames, LiteLLMFrames):
                # LiteLLM turns vLLM's reset into a clean end; the engine's request was aborted.
                await out.write(frames.reset_masked())
                await out.write_eof()
                return out
            assert request.transport is not None
            request.transport.abort()
        elif behavior.failure == "hang_mid":
            await asyncio.sleep(3600)
        elif behavior.failure == "in_band_error":
            self._finished(seen, "error", seen.choices)
            await out.write(frames.stream_error())
            await out.write_eof()
        else:  # "eof": the stream just ends, as trtllm-serve does on errors
            await out.write_eof()
        return out

    async def _stream_response(
        self,
        request: web.Request,
        out: web.StreamResponse,
        frames: Frames,
        behavior: Behavior,
        count: int,
        seen: Seen,
    ) -> web.StreamResponse:
        for event in frames.response_head():
            await out.write(event)
        if behavior.first_token_s:
            await asyncio.sleep(behavior.first_token_s)
        for i in range(count):
            if i and behavior.pace_s:
                await asyncio.sleep(behavior.pace_s)
            if behavior.failure and i == behavior.fail_after:
                return await self._fail_stream(request, out, behavior, frames, seen)
            await out.write(frames.response_delta(i))
            self._token(seen, i, seen.prompt_tokens or 0)
        self._finished(seen, "length" if count < behavior.tokens else "stop", 1)
        usage = frames.response_usage(count) if behavior.usage else None
        for event in frames.response_tail(count, usage):
            await out.write(event)
        await out.write_eof()
        return out


async def _write(out: web.StreamResponse, data: bytes) -> None:
    if data:  # some servers send nothing where vLLM sends a chunk (e.g. LiteLLM's role chunk)
        await out.write(data)


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _error(status: int, kind: str, message: str) -> web.Response:
    return _json(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}, status
    )


def _cli() -> None:
    parser = argparse.ArgumentParser(description="Run a simulated vLLM (or other) server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--flavor", default="vllm", choices=tuple(FLAVORS))
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="NAME[:TOKENS[:PACE_MS[:FLAVOR]]] (repeatable); default sim-llama",
    )
    parser.add_argument("--tokens", type=int, default=64, help="default tokens per answer")
    parser.add_argument("--pace-ms", type=float, default=0.0, help="default ms between tokens")
    args = parser.parse_args()
    models: dict[str, Behavior] = {}
    for spec in args.model or ["sim-llama"]:
        name, *rest = spec.split(":")
        tokens = int(rest[0]) if rest else args.tokens
        pace_ms = float(rest[1]) if len(rest) > 1 and rest[1] else args.pace_ms
        flavor = rest[2] if len(rest) > 2 else None
        if flavor is not None and flavor not in FLAVORS:
            parser.error(f"--model {spec}: unknown flavor; expected one of {', '.join(FLAVORS)}")
        models[name] = Behavior(tokens=tokens, pace_s=pace_ms / 1000, flavor=flavor)
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
