"""A minimal OpenAI-compatible server around a Llama-shaped model initialised at random from a
shape (no weights to download), batching continuously, for the GPU energy check
(benchmarks/energy_gpu_check.py). Not a product: greedy decoding of random weights, one word
per token, no prefix cache.

    python benchmarks/llama_server.py --shape 3b --device cuda --port 8000   # ~3B params, bf16
    python benchmarks/llama_server.py --shape tiny --device cpu --port 0      # tests

The engine runs on its own thread. Each step prefills waiting prompts first come first served,
in chunks, up to a token budget, then decodes one token for every running sequence in one
batched forward (a KV cache slot per sequence, attention masked to each one's length). Tokens
go back to the event loop as they are produced; responses are framed like vLLM's (a role chunk,
a chunk per token, the usage chunk when asked for, `data: [DONE]`). `max_tokens` tokens are
always generated (no end-of-sequence on random weights).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import queue
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from aiohttp import web

log = logging.getLogger("llama_server")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def params(self) -> int:
        hd = self.hidden // self.heads
        attn = self.hidden * hd * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * self.hidden * self.ffn) + 2 * self.vocab * self.hidden


SHAPES = {
    "3b": Shape(3072, 28, 24, 8, 8192, 32000),  # Llama-3.2-3B's body, a 32k vocabulary
    "1b": Shape(2048, 16, 32, 8, 8192, 32000),
    "tiny": Shape(64, 2, 4, 2, 128, 512),
}


class Model:
    """Llama-shaped: RMSNorm, rotary attention with grouped KV heads, SwiGLU; random weights,
    created directly on the device."""

    def __init__(
        self, shape: Shape, device: str, dtype: torch.dtype, max_seqs: int, max_len: int
    ) -> None:
        self.shape, self.device, self.max_len = shape, device, max_len
        gen = torch.Generator(device=device).manual_seed(0)
        hd = self.head_dim = shape.hidden // shape.heads

        def w(*size: int) -> torch.Tensor:
            std = 1.0 / math.sqrt(size[0])
            return torch.empty(size, device=device, dtype=dtype).normal_(0, std, generator=gen)

        self.embed = w(shape.vocab, shape.hidden) * math.sqrt(shape.vocab) / 50
        self.layers = [
            {
                "wq": w(shape.hidden, shape.heads * hd),
                "wk": w(shape.hidden, shape.kv_heads * hd),
                "wv": w(shape.hidden, shape.kv_heads * hd),
                "wo": w(shape.heads * hd, shape.hidden),
                "gate": w(shape.hidden, shape.ffn),
                "up": w(shape.hidden, shape.ffn),
                "down": w(shape.ffn, shape.hidden),
            }
            for _ in range(shape.layers)
        ]
        self.head = w(shape.hidden, shape.vocab)
        cache = (shape.layers, max_seqs, shape.kv_heads, max_len, hd)
        self.k = torch.zeros(cache, device=device, dtype=dtype)
        self.v = torch.zeros(cache, device=device, dtype=dtype)
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=device).float() / hd))
        angles = torch.outer(torch.arange(max_len, device=device).float(), inv)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T, hd]; pos: [B, T]
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]
        a, b = x[..., ::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    @torch.inference_mode()
    def forward(self, slots: list[int], ids: list[list[int]], starts: list[int]) -> list[int]:
        """Run `ids[i]` (a prompt chunk, or one token) for sequence slot `slots[i]`, whose cache
        already holds `starts[i]` tokens; return each sequence's next token (greedy)."""
        s, dev = self.shape, self.device
        n = max(len(x) for x in ids)
        tokens = torch.tensor([x + [0] * (n - len(x)) for x in ids], device=dev)
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(n, device=dev)[None]
        pos = pos.clamp(max=self.max_len - 1)
        slot = torch.tensor(slots, device=dev)
        first = torch.tensor(starts, device=dev)
        lengths = torch.tensor([st + len(x) for st, x in zip(starts, ids, strict=True)], device=dev)
        span = int(lengths.max())
        keys = torch.arange(span, device=dev)
        # a query sees keys up to its own position, within its own sequence
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, span]
        x = self.embed[tokens]
        for layer, p in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden,))
            q = (h @ p["wq"]).view(len(ids), n, s.heads, self.head_dim).transpose(1, 2)
            k = (h @ p["wk"]).view(len(ids), n, s.kv_heads, self.head_dim).transpose(1, 2)
            v = (h @ p["wv"]).view(len(ids), n, s.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, pos), self._rope(k, pos)
            if n == 1:  # a decode step: every sequence's one new key, in one copy
                self.k[layer][slot, :, first] = k[:, :, 0]
                self.v[layer][slot, :, first] = v[:, :, 0]
            else:
                for i, x_ids in enumerate(ids):  # each prompt chunk into its slot
                    m = len(x_ids)
                    self.k[layer, slots[i], :, starts[i] : starts[i] + m] = k[i, :, :m]
                    self.v[layer, slots[i], :, starts[i] : starts[i] + m] = v[i, :, :m]
            ks, vs = self.k[layer, slot, :, :span], self.v[layer, slot, :, :span]
            attn = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, enable_gqa=True)
            x = x + attn.transpose(1, 2).reshape(len(ids), n, -1) @ p["wo"]
            h = F.rms_norm(x, (s.hidden,))
            x = x + (F.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
        last = torch.tensor([len(x_ids) - 1 for x_ids in ids], device=dev)
        final = F.rms_norm(x[torch.arange(len(ids), device=dev), last], (s.hidden,))
        return (final @ self.head).argmax(-1).tolist()


@dataclass
class Sequence:
    prompt: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[int | None]
    slot: int = -1
    done_prompt: int = 0
    generated: int = 0
    last: int = 0
    cancelled: bool = False


@dataclass
class Engine:
    model: Model
    max_seqs: int
    chunk_tokens: int = 2048
    steps: int = 0
    _inbox: queue.Queue[Sequence] = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)

    def submit(self, seq: Sequence) -> None:
        self._inbox.put(seq)

    def run(self) -> None:
        free = list(range(self.max_seqs))
        waiting: list[Sequence] = []
        running: list[Sequence] = []
        while not self._stop.is_set():
            try:
                block = not waiting and not running
                while True:
                    waiting.append(self._inbox.get(block=block, timeout=0.1 if block else None))
                    block = False
            except queue.Empty:
                pass
            running = [s for s in running if not s.cancelled or self._free(s, free)]
            budget = self.chunk_tokens
            batch: list[tuple[Sequence, list[int], int]] = []
            for seq in running:  # decodes first: one token each
                if seq.done_prompt >= len(seq.prompt):
                    batch.append((seq, [seq.last], len(seq.prompt) + seq.generated - 1))
                    budget -= 1
            for seq in [s for s in running if s.done_prompt < len(s.prompt)] + waiting:
                if budget <= 0 or (seq.slot < 0 and not free):
                    break
                if seq.slot < 0:
                    seq.slot = free.pop()
                    waiting.remove(seq)
                    running.append(seq)
                chunk = seq.prompt[seq.done_prompt : seq.done_prompt + budget]
                batch.append((seq, chunk, seq.done_prompt))
                budget -= len(chunk)
            if not batch:
                continue
            # Decodes batch together; each prompt chunk runs on its own (different lengths).
            decodes = [b for b in batch if len(b[1]) == 1 and b[0].done_prompt >= len(b[0].prompt)]
            groups = [decodes] if decodes else []
            groups += [[b] for b in batch if b not in decodes]
            for group in groups:
                nxt = self.model.forward(
                    [b[0].slot for b in group], [b[1] for b in group], [b[2] for b in group]
                )
                for (seq, chunk, _), token in zip(group, nxt, strict=True):
                    if seq.done_prompt < len(seq.prompt):
                        seq.done_prompt += len(chunk)
                        if seq.done_prompt < len(seq.prompt):
                            continue  # more prompt to go: no token yet
                    seq.last = token
                    seq.generated += 1
                    seq.loop.call_soon_threadsafe(seq.out.put_nowait, token)
            self.steps += 1
            for seq in [s for s in running if s.generated >= s.max_tokens]:
                running.remove(seq)
                self._free(seq, free)
                seq.loop.call_soon_threadsafe(seq.out.put_nowait, None)

    def _free(self, seq: Sequence, free: list[int]) -> bool:
        if seq.slot >= 0:
            free.append(seq.slot)
            seq.slot = -1
        return False

    def stop(self) -> None:
        self._stop.set()


def tokenize(text: str, vocab: int) -> list[int]:
    """One token per whitespace-separated word (stable ids): prompt sizes are easy to set."""
    return [zlib.crc32(word.encode()) % (vocab - 1) + 1 for word in text.split()] or [1]


def _prompt_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        return " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return str(body.get("prompt", ""))


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return web.json_response(body, status=status)


def make_app(engine: Engine, model_name: str, max_len: int) -> web.Application:
    vocab = engine.model.shape.vocab
    serial = [0]

    async def models(request: web.Request) -> web.Response:
        data = [{"id": model_name, "object": "model", "owned_by": "llama_server"}]
        return web.json_response({"object": "list", "data": data})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = tokenize(_prompt_text(body), vocab)
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        if not isinstance(limit, int) or limit < 1:
            return _error(400, "max_tokens must be a positive integer")
        if len(prompt) + limit > max_len:
            return _error(400, f"prompt ({len(prompt)}) + max_tokens ({limit}) > {max_len}")
        loop = asyncio.get_running_loop()
        seq = Sequence(prompt, limit, loop, asyncio.Queue())
        engine.submit(seq)
        serial[0] += 1
        rid, created = f"chatcmpl-{serial[0]}", int(time.time())
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": limit,
            "total_tokens": len(prompt) + limit,
        }
        base = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
        }
        if body.get("stream") is not True:
            words = []
            try:
                while (token := await seq.out.get()) is not None:
                    words.append(f"t{token}")
            except asyncio.CancelledError:
                seq.cancelled = True
                raise
            message = {"role": "assistant", "content": " ".join(words)}
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
                    "usage": usage,
                }
            )
        out = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await out.prepare(request)
        delta = {"role": "assistant", "content": ""}
        await out.write(
            _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        )
        n = 0
        try:
            while (token := await seq.out.get()) is not None:
                n += 1
                finish = "length" if n == limit else None
                choice = {"index": 0, "delta": {"content": f" t{token}"}, "finish_reason": finish}
                await out.write(_sse({**base, "choices": [choice]}))
        except (asyncio.CancelledError, ConnectionResetError):
            seq.cancelled = True
            raise
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            await out.write(_sse({**base, "choices": [], "usage": usage}))
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def build(shape_name: str, device: str, max_seqs: int, max_len: int) -> Engine:
    shape = SHAPES[shape_name]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    started = time.monotonic()
    model = Model(shape, device, dtype, max_seqs, max_len)
    engine = Engine(model, max_seqs)
    model.forward([0], [[1, 2, 3, 4]], [0])  # warm the kernels
    model.forward([0, 1], [[5], [6]], [4, 0])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    log.info(
        "model %s: %.2fB parameters, %s on %s, ready in %.1f s",
        shape_name,
        shape.params / 1e9,
        dtype,
        device,
        time.monotonic() - started,
    )
    return engine


async def serve(args: argparse.Namespace) -> None:
    engine = build(args.shape, args.device, args.max_seqs, args.max_len)
    thread = threading.Thread(target=engine.run, name="engine", daemon=True)
    thread.start()
    runner = web.AppRunner(make_app(engine, args.model, args.max_len), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"llama_server listening on http://{args.host}:{port}/v1", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        engine.stop()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="random-llama")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-seqs", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=4096)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
