"""Record the raw bytes a real server sends for a fixed set of requests, for parser tests.

    python tests/data/record.py --base http://127.0.0.1:8080/v1 --set llama_cpp --model gemma-3-270m
    python tests/data/record.py --base http://127.0.0.1:4000/v1 --set litellm --key sk-... \
        --model sim-llama

The `litellm` set is LiteLLM's proxy (`model: hosted_vllm/*`) in front of this project's
simulated vLLM, serving the models of `LITELLM_MODELS` (tests/test_sim_litellm.py builds the
same fake to compare against).

Each case is written as `<set>/<case>.sse` (the body exactly as received) and described in
`<set>/cases.json`: the path, the request body, the status and content type of the response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).parent
MESSAGES = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "seed": 42}


def cases(model: str, kind: str) -> dict[str, tuple[str, dict[str, Any]]]:
    usage = {"stream_options": {"include_usage": True}}
    chat = {"model": model, "messages": MESSAGES, "max_tokens": 8, "stream": True, **GREEDY}
    completion = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "stream": True}
    completion.update(GREEDY)
    response = {"model": model, "input": MESSAGES[0]["content"], "max_output_tokens": 8}
    response.update(stream=True, **GREEDY)
    table: dict[str, tuple[str, dict[str, Any]]] = {
        "chat_stream": ("/chat/completions", chat),
        "chat_stream_usage": ("/chat/completions", {**chat, **usage}),
        "chat_stream_n2_usage": ("/chat/completions", {**chat, "n": 2, **usage}),
        "chat_stream_n2": ("/chat/completions", {**chat, "n": 2}),
        "completions_stream": ("/completions", completion),
        "completions_stream_usage": ("/completions", {**completion, **usage}),
        "responses_stream": ("/responses", response),
    }
    if kind == "litellm":
        for name in ("sim-r1", "sim-500", "sim-400", "sim-401", "sim-inband", "sim-inband0"):
            case = {**chat, **usage, "model": name}
            table[f"chat_stream_usage_{name[4:]}"] = ("/chat/completions", case)
        table["chat_stream_usage_reset"] = (
            "/chat/completions",
            {**chat, "model": "sim-reset", **usage},
        )
        table["chat"] = ("/chat/completions", {**chat, "stream": False})
        table["completions"] = ("/completions", {**completion, "stream": False})
    if kind == "llama_cpp":
        weather = {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
        table["chat_stream_tools_usage"] = (
            "/chat/completions",
            {
                **chat,
                "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                "tools": [weather],
                "max_tokens": 48,
                **usage,
            },
        )
    return table


async def record(base: str, kind: str, model: str, key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    index: dict[str, Any] = {}
    # A fresh connection per request: llama-server closes the connection after a stream while
    # still announcing keep-alive, and a reused one fails with "Cannot write request body".
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        for name, (path, body) in cases(model, kind).items():
            async with http.post(base + path, json=body) as response:
                raw = await response.read()
                index[name] = {
                    "path": "/v1" + path,
                    "request": body,
                    "status": response.status,
                    "content_type": response.headers.get("Content-Type"),
                    "raw": raw,
                }
    return index


def save(index: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, case in index.items():
        (out / f"{name}.sse").write_bytes(case.pop("raw"))
    (out / "cases.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the server's /v1 base URL")
    parser.add_argument("--set", required=True, choices=("llama_cpp", "litellm"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--key", default=None)
    args = parser.parse_args()
    save(asyncio.run(record(args.base, args.set, args.model, args.key)), HERE / args.set)


if __name__ == "__main__":
    main()
