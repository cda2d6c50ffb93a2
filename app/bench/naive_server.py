"""The naive baseline for `make bench`: transformers' generate() behind a tiny OpenAI-style server.

What a simple server does: one request at a time (a lock around generate()), no batching, no KV
reuse between requests. It speaks just enough of the API for `shardserve bench serve`: streamed
and plain /v1/completions and /v1/chat/completions with usage, /v1/models, /tokenize (vLLM's
shape) and /health. Tokens stream one by one through a generate() streamer, so its ITL is a real
per-token figure.

    python -m app.bench.naive_server --model HF_DIR [--host 127.0.0.1] [--port 8000]"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

_END = object()


class _Streamer:
    """generate()'s streamer: hands each new token id to the event loop (the prompt comes first)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for tid in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, tid)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, _END)


class _Cancelled:
    """A stopping criterion: the client went away."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def create_naive_app(model_dir: Path, served_name: str | None = None) -> FastAPI:
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    name = served_name or model_dir.name
    lock = asyncio.Lock()
    app = FastAPI(title="naive transformers server")

    def encode(body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            text = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(body["prompt"])["input_ids"]

    async def tokens(ids: list[int], body: dict[str, Any], cancel: _Cancelled) -> AsyncIterator[int]:
        """Generated token ids, one request at a time."""
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        queue: asyncio.Queue = asyncio.Queue()
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "max_new_tokens": n,
            "min_new_tokens": n if body.get("ignore_eos") else 0,
            "do_sample": temperature > 0,
            "pad_token_id": tok.eos_token_id,
            "streamer": _Streamer(asyncio.get_running_loop(), queue),
            "stopping_criteria": StoppingCriteriaList([cancel]),
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
        async with lock:
            worker = threading.Thread(target=_generate, args=(model, kwargs), daemon=True)
            worker.start()
            try:
                while (tid := await queue.get()) is not _END:
                    yield tid
            finally:
                cancel.event.set()  # no-op when generate() already finished
                await asyncio.to_thread(worker.join)

    async def completion(request: Request, chat: bool) -> Any:
        body = await request.json()
        ids = encode(body, chat)
        rid, created = f"naive-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list, usage: dict | None = None) -> str:
            body = {"id": rid, "object": chunk_kind, "created": created, "model": name, "choices": choices}
            return f"data: {json.dumps(body | {'usage': usage})}\n\n"

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def events() -> AsyncIterator[str]:
            out: list[int] = []
            sent = ""
            cancel = _Cancelled()
            async with contextlib.aclosing(tokens(ids, body, cancel)) as stream:
                async for tid in stream:
                    out.append(tid)
                    text = tok.decode(out, skip_special_tokens=True)
                    if text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
                        continue
                    yield event([choice(text[len(sent) :], None)])
                    sent = text
            finish = "length" if len(out) >= int(body.get("max_tokens") or 16) else "stop"
            yield event([choice("", finish)])
            if (body.get("stream_options") or {}).get("include_usage"):
                yield event([], _usage(len(ids), len(out)))
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        out = [tid async for tid in tokens(ids, body, _Cancelled())]
        text = tok.decode(out, skip_special_tokens=True)
        c = (
            {"index": 0, "message": {"role": "assistant", "content": text}}
            if chat
            else {"index": 0, "text": text}
        )
        c["finish_reason"] = "length" if len(out) >= int(body.get("max_tokens") or 16) else "stop"
        return {"id": rid, "object": kind, "created": created, "model": name, "choices": [c],
                "usage": _usage(len(ids), len(out))}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await completion(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await completion(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "naive"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await request.json()
        ids = tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        return JSONResponse({"count": len(ids), "tokens": ids})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _generate(model: Any, kwargs: dict[str, Any]) -> None:
    try:
        with torch.inference_mode():
            model.generate(**kwargs)
    finally:
        kwargs["streamer"].end()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m app.bench.naive_server", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a Hugging Face model folder")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    app = create_naive_app(a.model, a.served_model_name)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
