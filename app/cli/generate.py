"""`shardserve generate`: one request through the full engine and worker pool, printed as it streams."""

from __future__ import annotations

import argparse
import queue
import sys
import time
import uuid

from app.api import protocol as p
from app.api.errors import APIError
from app.api.prepare import sampling_params
from app.engine.types import GenerateRequest, RequestOutput
from app.settings import Settings
from app.stack import build_stack


def generate(settings: Settings, ns: argparse.Namespace) -> int:
    outputs: queue.SimpleQueue[list[RequestOutput]] = queue.SimpleQueue()
    stack = build_stack(settings, on_outputs=outputs.put)
    tok = stack.tokenizer
    if ns.chat:
        text = tok.apply_chat_template([{"role": "user", "content": ns.prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(ns.prompt)
    # the API's own decision: --max-tokens is a cap, clipped to the room the prompt leaves
    body = p.CompletionRequest(prompt=ids, temperature=ns.temperature, top_p=ns.top_p, seed=ns.sample_seed)
    try:
        params = sampling_params(
            body,
            ids,
            max_model_len=stack.max_model_len,
            vocab_size=stack.card.vocab_size,
            generation_defaults={},
            default_max_tokens=ns.max_tokens,
            max_logprobs=settings.max_logprobs,
        )
    except APIError as e:
        raise ValueError(e.message) from None
    stack.start()
    try:
        t0 = time.monotonic()
        stack.engine.add_request(GenerateRequest(uuid.uuid4().hex, tuple(ids), params, time.monotonic()))
        done, n_out, first = False, 0, None
        while not done:
            for out in outputs.get():
                first = first or time.monotonic()
                sys.stdout.write(out.text)
                sys.stdout.flush()
                n_out = out.completion_tokens
                if out.finish_reason is not None:
                    done = True
                    if out.error:
                        raise ValueError(out.error)
        total = time.monotonic() - t0
        decode = (total - (first - t0)) / max(1, n_out - 1)
        print(
            f"\n[{n_out} tokens, finish: {out.finish_reason.value}, TTFT {first - t0:.3f}s, "
            f"{1 / decode if decode > 0 else 0:.1f} tok/s, dtype {stack.dtype}, tp {settings.tp}]",
            file=sys.stderr,
        )
    finally:
        stack.shutdown()
    return 0
