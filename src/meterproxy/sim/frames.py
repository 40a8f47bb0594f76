"""How vLLM (and trtllm-serve) serialize OpenAI responses: chunks, usage, bodies, ids."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .upstream import Behavior

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


class Frames:
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
        self.id = make_id(
            {"chat": "chatcmpl", "completion": "cmpl", "response": "resp"}[kind], body
        )
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
                    "status": status,
                    "content": [
                        {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
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
                # OpenAI's shape for a reply cut by max_output_tokens
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete"
                else None,
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


def full_body(
    body: dict[str, Any], behavior: Behavior, kind: str, count: int, finish: str, prompt: int
) -> dict[str, Any]:
    frames = Frames("vllm", body, kind, prompt, behavior, False)
    text = "".join(WORDS[i % len(WORDS)] for i in range(count))
    usage = frames._usage(count, details=True) if behavior.usage else None
    if kind == "response":
        result = frames.response(
            "incomplete" if finish == "length" else "completed",
            count,
            frames.response_usage(count) if behavior.usage else None,
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
