"""OpenAI's hosted API format (flavor `openai`), for the chunks that differ from vLLM's.

Taken from recorded api.openai.com streams (envoyproxy/ai-gateway's tests, e.g.
tests/extproc/testupstream_test.go, cassette `chat-streaming-detailed-usage`) and from the
openai SDK's `ChatCompletionStreamOptionsParam` docstring: once `include_usage` is set every
chunk carries `"usage":null`, and a final chunk with `"choices":[]` carries the usage; without
it no chunk has a `usage` key. Chunks add `service_tier`, `system_fingerprint` and an
`obfuscation` padding string (left out when `stream_options.include_obfuscation` is false); the
finish_reason comes in a chunk of its own with an empty delta; a Responses stream cut by
`max_output_tokens` ends in `response.incomplete` (status `incomplete`, `incomplete_details`), one
the engine fails ends in `response.failed` (the API reference's streaming events); replies carry
an `x-request-id`
of the form `req_<hex>`; error bodies have OpenAI's `type`/`code` strings; non-streamed bodies
are indented JSON.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson

from .frames import CREATED, WORDS, Frames, text_of

FINGERPRINT = "fp_f986a632b0"


def request_id(seed: bytes) -> str:
    return "req_" + hashlib.sha256(seed).hexdigest()[:32]


class HostedFrames(Frames):
    def _padding(self, index: int, position: int) -> str:
        # OpenAI pads each chunk with a random string; here it is fixed per chunk position.
        digest = hashlib.sha256(f"{self.id}:{index}:{position}".encode()).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")[: 1 + position % 15]

    def _hosted_chunk(
        self, choices: list[dict[str, Any]], index: int, position: int, usage: Any = None
    ) -> bytes:
        chunk: dict[str, Any] = {"id": self.id, "object": self.object, "created": CREATED}
        if self.kind == "chat":
            chunk.update(model=self.model, service_tier="default")
            chunk.update(system_fingerprint=FINGERPRINT, choices=choices)
        else:  # the legacy completions endpoint puts the model after the choices
            chunk.update(choices=choices, model=self.model)
        if self.include_usage:
            chunk["usage"] = usage
        if (self.body.get("stream_options") or {}).get("include_obfuscation") is not False:
            chunk["obfuscation"] = self._padding(index, position)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _choice(self, index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        text = delta.get("content", "")
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    def role(self, index: int = 0) -> bytes:
        delta = {"role": "assistant", "content": "", "refusal": None}
        return self._hosted_chunk([self._choice(index, delta, None)], index, 0)

    def token(self, i: int, finish: str | None, index: int = 0) -> bytes:
        word = WORDS[i % len(WORDS)]
        return self._hosted_chunk([self._choice(index, {"content": word}, None)], index, i + 1)

    def finish(self, finish: str, index: int = 0) -> bytes:
        return self._hosted_chunk([self._choice(index, {}, finish)], index, 10_000)

    def usage(self, completion: int) -> bytes:
        return self._hosted_chunk([], 0, 10_001, self._details(completion))

    def _details(self, completion: int) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt,
            "completion_tokens": completion,
            "total_tokens": self.prompt + completion,
        }
        if self.kind == "chat":
            usage["prompt_tokens_details"] = {
                "cached_tokens": self.behavior.cached_tokens or 0,
                "audio_tokens": 0,
            }
            usage["completion_tokens_details"] = {
                "reasoning_tokens": min(completion, self.behavior.reasoning_tokens or 0),
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            }
        return usage

    def full_body(self, count: int, finish: str, n: int = 1) -> dict[str, Any]:
        if self.kind == "response":
            return super().full_body(count, finish, n)
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": CREATED,
            "model": self.model,
            "choices": [self.full_choice(index, count, finish) for index in range(n)],
        }
        if self.behavior.usage:
            out["usage"] = self._details(n * count)
        if self.kind == "chat":
            out.update(service_tier="default", system_fingerprint=FINGERPRINT)
        return out

    def full_choice(self, index: int, count: int, finish: str) -> dict[str, Any]:
        if self.kind == "chat":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text_of(count),
                "refusal": None,
                "annotations": [],
            }
            return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
        return {"text": text_of(count), "index": index, "logprobs": None, "finish_reason": finish}

    # -- Responses: incomplete when cut, failed when the engine fails -----------------------

    def _truncated(self) -> bool:
        limit = self.body.get("max_output_tokens")
        return isinstance(limit, int) and limit < self.behavior.tokens

    def response(self, status: str, count: int, usage: Any) -> dict[str, Any]:
        if status == "completed" and self._truncated():
            status = "incomplete"
        event = super().response(status, count, usage)
        if status == "incomplete":
            event["response"]["incomplete_details"] = {"reason": "max_output_tokens"}
        return event

    def response_tail(self, count: int, usage: Any) -> list[bytes]:
        event = self.response("completed", count, usage)
        return [self.event(event["type"], event)]

    def stream_error(self) -> bytes:
        if self.kind != "response":
            return super().stream_error()
        event = self.response("failed", 0, None)
        event["response"]["error"] = {
            "code": "server_error",
            "message": "The server had an error while processing your request. Sorry about that!",
        }
        return self.event("response.failed", event)

    def dumps(self, payload: Any) -> bytes:
        return orjson.dumps(payload, option=orjson.OPT_INDENT_2)

    @staticmethod
    def headers(seed: bytes) -> dict[str, str]:
        return {"x-request-id": request_id(seed)}

    @staticmethod
    def http_error(failure: str, model: str, authorization: str) -> tuple[int, str, bytes] | None:
        errors = {
            "http_400": (
                400,
                "This model's maximum context length is 8192 tokens. However, your messages "
                "resulted in 9000 tokens. Please reduce the length of the messages.",
                "invalid_request_error",
                "messages",
                "context_length_exceeded",
            ),
            "http_401": (
                401,
                f"Incorrect API key provided: {authorization[7:13]}****. You can find your "
                "API key at https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                None,
                "invalid_api_key",
            ),
            "http_500_html": (
                500,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
                None,
            ),
        }
        if failure not in errors:
            return None
        status, message, kind, param, code = errors[failure]
        error = {"message": message, "type": kind, "param": param, "code": code}
        body = orjson.dumps({"error": error}, option=orjson.OPT_INDENT_2)
        return status, "application/json", body
