"""The HTTP side of `shardserve bench serve`: one streamed request, timed, and the server's tokenizer.

Works against any OpenAI-compatible server: ours, vLLM's, llama.cpp's llama-server and the naive
baseline (app/bench/naive_server.py). The one thing they do not share is /tokenize's request
shape (vLLM's and ours take "prompt", llama-server's takes "content"), so ServerTokenizer tries both."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Sent:
    """What came back for one request, before its tokens are counted."""

    start: float
    success: bool = False
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks that carried text
    text: str = ""
    prompt_tokens: int | None = None  # from the server's usage, when it sent one
    completion_tokens: int | None = None
    error: str = ""


def payload(
    endpoint: str, model: str, prompt: str, max_tokens: int, *, ignore_eos: bool, temperature: float
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,  # not max_completion_tokens: llama-server and older servers know this one
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension that llama-server and ours accept too
    return body


def _chunk_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


async def stream_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Sent:
    """POST body, read the SSE stream to [DONE], timestamping every chunk that carries text."""
    sent = Sent(start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode("utf-8", "replace")[:300]
                sent.error = f"HTTP {resp.status_code}: {detail}"
                return sent
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (keep-alive pings)
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    sent.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return sent
                for choice in event.get("choices") or []:
                    if text := _chunk_text(choice):
                        sent.chunk_times.append(now)
                        sent.text += text
                    if choice.get("finish_reason") in ("error", "timeout"):
                        sent.error = f"finish_reason {choice['finish_reason']}"
                        return sent
                if usage := event.get("usage"):
                    sent.prompt_tokens = usage.get("prompt_tokens")
                    sent.completion_tokens = usage.get("completion_tokens")
            if not done:
                sent.error = "the stream ended without data: [DONE]"
            elif not sent.chunk_times:
                sent.error = "no chunk carried any text"
            else:
                sent.success = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        sent.error = f"{type(e).__name__}: {e}"[:300]
    return sent


class ServerTokenizer:
    """Counts tokens with the server's own /tokenize (vLLM's shape, else llama.cpp's)."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, model: str, shape: str) -> None:
        self.client, self.url, self.model, self.shape = client, base_url + "/tokenize", model, shape

    @classmethod
    async def probe(cls, client: httpx.AsyncClient, base_url: str, model: str) -> ServerTokenizer | None:
        """The server's tokenizer, or None when it has no /tokenize we can speak."""
        for shape in ("vllm", "llama.cpp"):
            tok = cls(client, base_url, model, shape)
            try:
                if await tok.count("Hello world") > 0:
                    return tok
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                continue
        return None

    async def count(self, text: str) -> int:
        if self.shape == "vllm":
            body: dict[str, Any] = {"model": self.model, "prompt": text, "add_special_tokens": False}
        else:
            body = {"content": text, "add_special": False}
        resp = await self.client.post(self.url, json=body)
        resp.raise_for_status()
        return len(resp.json()["tokens"])


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(base_url + "/v1/models")
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]
