"""`shardserve generate`: one request through the full engine and worker pool, printed as it streams."""

from __future__ import annotations

import argparse
import queue
import sys
import time
import uuid

from app.engine.types import GenerateRequest, RequestOutput, SamplingParams
from app.runtime import build_runtime
from app.settings import Settings


def generate(settings: Settings, ns: argparse.Namespace) -> int:
    outputs: queue.SimpleQueue[list[RequestOutput]] = queue.SimpleQueue()
    runtime = build_runtime(settings, on_outputs=outputs.put)
    tok = runtime.tokenizer
    if ns.chat:
        text = tok.apply_chat_template([{"role": "user", "content": ns.prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(ns.prompt)
    max_tokens = max(1, min(ns.max_tokens, runtime.max_model_len - len(ids)))
    if len(ids) >= runtime.max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context limit is {runtime.max_model_len}")
    params = SamplingParams(
        temperature=ns.temperature, top_p=ns.top_p, seed=ns.sample_seed, max_tokens=max_tokens
    )
    runtime.start()
    try:
        t0 = time.monotonic()
        runtime.engine.add_request(GenerateRequest(uuid.uuid4().hex, tuple(ids), params, time.monotonic()))
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
            f"{1 / decode if decode > 0 else 0:.1f} tok/s, dtype {runtime.dtype}, tp {settings.tp}]",
            file=sys.stderr,
        )
    finally:
        runtime.shutdown()
    return 0
