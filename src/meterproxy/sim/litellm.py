"""LiteLLM's proxy in front of vLLM (flavor `litellm`): the bytes LiteLLM sends, not vLLM's.

Recorded from `litellm[proxy]==1.80.0` (PyPI) with `model: hosted_vllm/<name>` in front of
this fake's vLLM flavor; the recordings are tests/data/litellm/ and tests/test_sim_litellm.py
checks this module against them. What matters to a meter, with LiteLLM's source for each:
- Usage rides on a chunk that still has a choice (`{"index":0,"delta":{}}`): the chunk
  `CustomStreamWrapper` builds with `model_response_creator()` in
  litellm/litellm_core_utils/streaming_handler.py, whose default has one empty choice.
- Without `include_usage`, text-completion chunks each carry an all-zero `usage`.
- An engine error before the first chunk is answered with the error's status (503 for an
  engine failure) and the error as an SSE event: `create_streaming_response` in
  litellm/proxy/common_request_processing.py reads the first chunk before choosing the status.
  Mid-stream the error event (Python `json.dumps`, so `", "` separators) ends the stream, no
  `[DONE]` (`async_data_generator` in litellm/proxy/proxy_server.py).
- An upstream reset mid-stream becomes a clean finish (`"finish_reason":"stop"`, `[DONE]`).
- With `n` > 1 only the first choice gets a role and a finish_reason; usage sums all choices.
- Responses streams carry the event type only inside the data (no `event:` lines) and end
  without `[DONE]` (`_format_responses_sse_chunk` and `ends_with_openai_done` in
  proxy_server.py of litellm 1.110.2; 1.80.0 still appended a `[DONE]`).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from .frames import CREATED, DONE, WORDS, Frames, text_of

PROVIDER = "hosted_vllm"
ZERO_USAGE = {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0}


def _error_event(message: str, code: str) -> bytes:
    error = {"error": {"message": message, "type": None, "param": None, "code": code}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"


def _group(model: str) -> str:
    return f"Received Model Group={model}\nAvailable Model Group Fallbacks=None"


def _engine_error(model: str) -> bytes:
    """vLLM's in-band EngineDeadError as LiteLLM re-raises it: a 503 ServiceUnavailableError."""
    message = (
        "litellm.ServiceUnavailableError: litellm.MidStreamFallbackError: "
        "litellm.APIConnectionError: APIConnectionError: OpenAIException - The engine "
        f"encountered an error (EngineDeadError).. {_group(model)}"
    )
    return _error_event(message, "503")


class LiteLLMFrames(Frames):
    def _lchunk(self, choices: list[dict[str, Any]], *, routed: bool, usage: Any = None) -> bytes:
        # LiteLLM names the model as routed (`hosted_vllm/<name>`) on the chunks it makes itself.
        model = f"{PROVIDER}/{self.model}" if routed else self.model
        if self.kind == "chat":
            chunk: dict[str, Any] = {"id": self.id, "created": CREATED, "model": model}
            chunk.update(object="chat.completion.chunk", choices=choices)
        else:
            chunk = {"id": self.id, "object": "text_completion", "created": CREATED}
            chunk.update(model=self.model, choices=choices)
            if usage is None and not self.include_usage:
                usage = ZERO_USAGE
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    @staticmethod
    def engine_input(body: dict[str, Any]) -> Any:
        if isinstance(body.get("input"), str):  # Responses, bridged to a chat completion
            return [{"role": "user", "content": body["input"]}]
        return Frames.engine_input(body)

    def role(self, index: int = 0) -> bytes:
        return b""  # merged into the first token's delta

    def token(self, i: int, finish: str | None, index: int = 0) -> bytes:
        if self.behavior.failure == "reset":
            return b""  # recorded: none of the tokens before vLLM's reset reached the client
        word = WORDS[i % len(WORDS)]
        if self.kind != "chat":
            return self._lchunk([{"index": index, "text": word}], routed=False)
        # Only the first choice's first delta gets the role (n=2 was recorded so).
        first = i == 0 and index == 0
        delta = {"content": word, "role": "assistant"} if first else {"content": word}
        return self._lchunk([{"index": index, "delta": delta}], routed=False)

    def finish(self, finish: str, index: int = 0) -> bytes:
        if index > 0:
            return b""  # LiteLLM sends the first choice's finish_reason only
        if self.kind != "chat":
            return self._lchunk([{"finish_reason": finish, "index": index}], routed=False)
        choice = {"finish_reason": finish, "index": index, "delta": {}}
        return self._lchunk([choice], routed=True)

    def usage(self, completion: int) -> bytes:
        usage: dict[str, Any] = {
            "completion_tokens": completion,
            "prompt_tokens": self.prompt,
            "total_tokens": self.prompt + completion,
            "completion_tokens_details": {
                "reasoning_tokens": min(completion, self.behavior.reasoning_tokens or 0)
            },
        }
        if self.behavior.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.behavior.cached_tokens}
        choice: dict[str, Any] = {"index": 0, "delta": {}} if self.kind == "chat" else {"index": 0}
        return self._lchunk([choice], routed=self.kind == "chat", usage=usage)

    def stream_error(self) -> bytes:
        return _engine_error(self.model)

    def reset_masked(self) -> bytes:
        """What LiteLLM sends when vLLM resets the stream: a clean end (it was recorded so)."""
        chunks = [
            self._lchunk([{"finish_reason": "stop", "index": 0, "delta": {}}], routed=True),
            self._lchunk([{"index": 0, "delta": {}}], routed=True),
        ]
        return b"".join(chunks) + DONE

    # -- Responses: `data:` lines only, the type inside; no [DONE] ------------------------

    def event(self, name: str, payload: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def _envelope(self, status: str) -> dict[str, Any]:
        envelope: dict[str, Any] = {
            "id": self.id,
            "created_at": CREATED,
            "model": self.model,
            "object": "response",
            "output": [],
            "parallel_tool_calls": True,
        }
        envelope.update(self._temperature())
        envelope.update(tool_choice="auto", tools=[], top_p=1.0, reasoning={}, status=status)
        envelope["store"] = True
        return envelope

    def _temperature(self) -> dict[str, float]:
        temperature = self.body.get("temperature")
        return {} if temperature is None else {"temperature": float(temperature)}

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": []}

    def response_head(self) -> list[bytes]:
        item = {
            "id": self.item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        return [
            self.event("", {"type": "response.created", "response": self._envelope("in_progress")}),
            self.event(
                "", {"type": "response.in_progress", "response": self._envelope("in_progress")}
            ),
            self.event("", {"type": "response.output_item.added", "output_index": 0, "item": item}),
            self.event(
                "",
                {
                    "type": "response.content_part.added",
                    "item_id": self.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": self._part(""),
                },
            ),
        ]

    def response_delta(self, i: int) -> bytes:
        payload = {
            "type": "response.output_text.delta",
            "item_id": self.id,  # the bridged chat completion's id
            "output_index": 0,
            "content_index": 0,
            "delta": WORDS[i % len(WORDS)],
        }
        return self.event("", payload)

    def response_tail(self, count: int, usage: Any) -> list[bytes]:
        text = text_of(count)
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        message = {
            "id": self.item_id,
            "status": "completed",
            "type": "message",
            "role": "assistant",
            "content": [self._part(text)],
        }
        # The bridged chat completion, as LiteLLM turns it back into a response.
        completed: dict[str, Any] = {
            "id": self.id,
            "created_at": CREATED,
            "metadata": {},
            "model": self.model,
            "object": "chat.completion",
            "output": [
                {
                    "type": "message",
                    "id": self.id,
                    "status": "completed",
                    "role": "assistant",
                    "content": [self._part(text)],
                }
            ],
            "parallel_tool_calls": False,
        }
        completed.update(self._temperature())
        completed.update(tool_choice="auto", tools=[], reasoning={}, status="completed", text={})
        if usage is not None:
            completed["usage"] = usage
        return [
            self.event("", {"type": "response.output_text.done", **where, "text": text}),
            self.event(
                "", {"type": "response.content_part.done", **where, "part": self._part(text)}
            ),
            self.event(
                "",
                {
                    "type": "response.output_item.done",
                    "output_index": 0,
                    "sequence_number": 1,
                    "item": message,
                },
            ),
            self.event("", {"type": "response.completed", "response": completed}),
        ]

    def response_usage(self, count: int) -> dict[str, Any]:
        total = self.prompt + count
        return {"input_tokens": self.prompt, "output_tokens": count, "total_tokens": total}

    # -- whole bodies and errors ----------------------------------------------------------

    def full_body(self, count: int, finish: str, n: int = 1) -> dict[str, Any]:
        if self.kind == "response":
            return super().full_body(count, finish, n)
        usage: dict[str, Any] = {
            "completion_tokens": n * count,
            "prompt_tokens": self.prompt,
            "total_tokens": self.prompt + n * count,
        }
        choices = [self.full_choice(index, count, finish) for index in range(n)]
        if self.kind == "chat":
            return {
                "id": self.id,
                "created": CREATED,
                "model": f"{PROVIDER}/{self.model}",
                "object": "chat.completion",
                "choices": choices,
                "usage": usage,
            }
        usage.update(completion_tokens_details=None, prompt_tokens_details=None)
        return {
            "id": self.id,
            "object": "text_completion",
            "created": CREATED,
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": None,
        }

    def full_choice(self, index: int, count: int, finish: str) -> dict[str, Any]:
        if self.kind == "chat":
            return {
                "finish_reason": finish,
                "index": index,
                "message": {
                    "content": text_of(count),
                    "role": "assistant",
                    "provider_specific_fields": {"refusal": None},
                },
                "provider_specific_fields": {"stop_reason": None},
            }
        return {
            "stop_reason": None,
            "prompt_logprobs": None,
            "finish_reason": finish,
            "index": index,
            "text": text_of(count),
            "logprobs": None,
        }

    @staticmethod
    def http_error(failure: str, model: str, authorization: str) -> tuple[int, str, bytes] | None:
        group = _group(model)
        messages = {
            "http_500_html": (
                500,
                "litellm.InternalServerError: InternalServerError: Hosted_vllmException - "
                f"Error code: 500. {group}",
            ),
            "http_400": (
                400,
                "litellm.ContextWindowExceededError: litellm.BadRequestError: "
                "ContextWindowExceededError: Hosted_vllmException - This model's maximum "
                f"context length is 8192 tokens.\nmodel={model}. context_window_fallbacks=None. "
                "fallbacks=None.\n\nSet 'context_window_fallback' - "
                f"https://docs.litellm.ai/docs/routing#fallbacks. {group}",
            ),
            "http_401": (
                401,
                "litellm.AuthenticationError: AuthenticationError: Hosted_vllmException - "
                f"Incorrect API key provided: {authorization[7:13]}****. {group}",
            ),
        }
        if failure == "in_band_error_first":
            # The engine failed on its first chunk: LiteLLM answers with the error's status
            # and the error as an event (see the module docstring).
            return 503, "text/event-stream; charset=utf-8", _engine_error(model)
        if failure not in messages:
            return None
        status, message = messages[failure]
        error = {"message": message, "type": None, "param": None, "code": str(status)}
        return status, "application/json", orjson.dumps({"error": error})
