"""How vLLM (and trtllm-serve) serialize OpenAI responses: chunks, usage, bodies, ids.

The chunk shapes follow vLLM's `chat_completion_stream_generator` in
vllm/entrypoints/openai/chat_completion/serving.py: every chunk is
`model_dump_json(exclude_unset=True)`, each carries one choice; with `n` > 1 each choice gets
its own role chunk and its own token chunks (interleaved step by step), continuous usage counts
that choice's tokens, and the one final usage chunk sums the completions of all choices.
Other servers' formats subclass `Frames` (sim/hosted.py: OpenAI; sim/litellm.py: LiteLLM).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .upstream import Behavior

CREATED = 1_730_000_000
DONE = b"data: [DONE]\n\n"


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


def text_of(count: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(count))


class Frames:
    """Serializes chunks the way the flavor's server does (here: vLLM, trtllm-serve)."""

    def __init__(
        self,
        flavor: str,
        body: dict[str, Any],
        kind: str,
        prompt: int,
        behavior: Behavior,
        continuous: bool,
        include_usage: bool = False,
    ) -> None:
        self.flavor, self.kind, self.prompt, self.behavior = flavor, kind, prompt, behavior
        self.continuous, self.include_usage = continuous, include_usage
        self.body = body
        self.model = body["model"]
        self.id = make_id(
            {"chat": "chatcmpl", "completion": "cmpl", "response": "resp"}[kind], body
        )
        self.item_id = "msg_" + self.id[-16:]
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    # -- streamed chat and completions ----------------------------------------------------

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

    def role(self, index: int = 0) -> bytes:
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        usage = self._usage(0, details=False) if self.continuous else None
        # trtllm-serve's role chunk carries a stray space before the blank line.
        tail = b" \n\n" if self.flavor == "trtllm" else b"\n\n"
        return b"data: " + self._chunk([choice], usage) + tail

    def token(self, i: int, finish: str | None, index: int = 0) -> bytes:
        """Token `i` of choice `index`; vLLM sends the finish_reason on the last token's chunk."""
        word = WORDS[i % len(WORDS)]
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": word},
                "logprobs": None,
                "finish_reason": finish,
                "token_ids": None,
            }
        else:
            choice = {
                "index": index,
                "text": word,
                "logprobs": None,
                "finish_reason": finish,
                "token_ids": None,
            }
        if finish is not None:
            choice["stop_reason"] = None
        usage = self._usage(i + 1, details=False) if self.continuous else None
        return b"data: " + self._chunk([choice], usage) + b"\n\n"

    def finish(self, finish: str, index: int = 0) -> bytes:
        """A chunk of its own for the finish_reason, for servers that send one (not vLLM)."""
        return b""

    def usage(self, completion: int) -> bytes:
        """The usage chunk after all choices: the prompt once, the completions of all choices."""
        return b"data: " + self._chunk([], self._usage(completion, details=True)) + b"\n\n"

    def done(self) -> bytes:
        return DONE

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

    def stream_error(self) -> bytes:
        """The in-band error event of an engine that fails mid-stream."""
        if self.kind == "response":
            return b""  # vLLM's failing Responses stream is not reproduced: it just ends
        error = {
            "error": {
                "message": "The engine encountered an error (EngineDeadError).",
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        }
        # vLLM ends every stream with [DONE]; trtllm-serve doesn't.
        done = DONE if self.flavor == "vllm" else b""
        return b"data: " + orjson.dumps(error) + b"\n\n" + done

    # -- streamed Responses ---------------------------------------------------------------

    def event(self, name: str, payload: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def response_head(self) -> list[bytes]:
        return [self.event("response.created", self.response("in_progress", 0, None))]

    def response_delta(self, i: int) -> bytes:
        payload = {
            "type": "response.output_text.delta",
            "content_index": 0,
            "delta": WORDS[i % len(WORDS)],
            "item_id": self.item_id,
            "output_index": 0,
            "sequence_number": i + 1,
            "logprobs": [],
        }
        return self.event("response.output_text.delta", payload)

    def response_tail(self, count: int, usage: Any) -> list[bytes]:
        """The terminal event (and whatever follows it: a Responses stream has no [DONE])."""
        return [self.event("response.completed", self.response("completed", count, usage))]

    def response(self, status: str, count: int, usage: Any) -> dict[str, Any]:
        output = (
            [
                {
                    "id": self.item_id,
                    "type": "message",
                    "role": "assistant",
                    "status": status,
                    "content": [
                        {
                            "type": "output_text",
                            "text": text_of(count),
                            "annotations": [],
                            "logprobs": None,
                        }
                    ],
                }
            ]
            if status in ("completed", "incomplete")
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

    # -- whole bodies, headers, errors ----------------------------------------------------

    @staticmethod
    def engine_input(body: dict[str, Any]) -> Any:
        """What the engine tokenizes as the prompt."""
        return body.get("messages", body.get("prompt", body.get("input")))

    def dumps(self, payload: Any) -> bytes:
        return orjson.dumps(payload)

    @staticmethod
    def headers(seed: bytes) -> dict[str, str]:
        """Headers of this server's replies beyond the content type (`seed`: per request)."""
        return {}

    @staticmethod
    def http_error(failure: str, model: str, authorization: str) -> tuple[int, str, bytes] | None:
        """(status, content type, body) of a failure answered before any token; None: vLLM's."""
        return None

    def full_body(self, count: int, finish: str, n: int = 1) -> dict[str, Any]:
        """The non-streamed reply: `n` choices of `count` tokens each."""
        usage = self._usage(n * count, details=True) if self.behavior.usage else None
        if self.kind == "response":
            result = self.response(
                "completed", count, self.response_usage(count) if self.behavior.usage else None
            )
            response: dict[str, Any] = result["response"]
            return response
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": CREATED,
            "model": self.model,
            "choices": [self.full_choice(index, count, finish) for index in range(n)],
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def full_choice(self, index: int, count: int, finish: str) -> dict[str, Any]:
        if self.kind == "chat":
            return {
                "index": index,
                "message": {
                    "role": "assistant",
                    "content": text_of(count),
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
        return {
            "index": index,
            "text": text_of(count),
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "prompt_logprobs": None,
        }


def prompt_tokens(value: Any) -> int:
    """The fake's own prompt count: words plus per-message framing. Deterministic, not tiktoken."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.split()) + 1
    if isinstance(value, list):
        if is_ids(value):
            return len(value)
        return sum(prompt_tokens(v) for v in value) + 2
    if isinstance(value, dict):
        return prompt_tokens(value.get("content")) + 3
    return 1


def is_ids(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, int) for v in value)


def make_id(prefix: str, body: dict[str, Any]) -> str:
    # Deterministic (vLLM's are random) so streams can be compared byte for byte; options the
    # proxy may add are left out of the hash.
    key = {k: v for k, v in body.items() if k != "stream_options"}
    digest = hashlib.sha256(orjson.dumps(key, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}-{digest[:32]}"
