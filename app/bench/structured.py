"""`shardserve bench structured`: what constrained decoding costs, engine only (no HTTP).

For 1 and --concurrency constrained streams: the time llguidance takes to compute a step's masks
(on the engine thread, while the ranks run the forward), and the output throughput of constrained
streams against the same number of free ones on the same prompts. Both produce exactly --output-len
tokens: free streams ignore EOS, constrained ones write a JSON string whose schema needs more
characters than that, so the grammar never lets them end early (target: constrained costs < 15%)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from app.bench.engine import Driver, random_prompts, requests
from app.engine.types import GrammarSpec, SamplingParams
from app.settings import Settings


def _grammar(output_len: int) -> GrammarSpec:
    chars = output_len * 8  # no token is longer than this on average: the string cannot close in time
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": chars, "maxLength": chars}},
              "required": ["text"]}  # fmt: skip
    return GrammarSpec("json_schema", json.dumps(schema))


def run(args: argparse.Namespace) -> dict:
    per_request = args.input_len + args.output_len + 32  # the context served: the cache holds every request
    settings = Settings(model=args.model, dtype=args.dtype, max_num_seqs=max(args.concurrency),
                        kv_cache_tokens=max(args.concurrency) * per_request, max_model_len=per_request)  # fmt: skip
    driver = Driver(settings)
    grammars = driver.rt.grammars
    mask_ms: list[float] = []
    timed = grammars.masks

    def masks(matchers):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return timed(matchers)
        finally:
            mask_ms.append((time.perf_counter() - t0) * 1000)

    grammars.masks = masks  # type: ignore[method-assign]
    spec = _grammar(args.output_len)
    grammars.check(spec)
    rows = []
    try:
        for c in args.concurrency:
            prompts = random_prompts(driver, c, args.input_len, args.seed)
            params = SamplingParams(temperature=args.temperature, seed=args.seed, ignore_eos=True)
            free = driver.run(f"free-{c}", requests(prompts, args.output_len, params, f"f{c}"), c)
            constrained_reqs = [
                replace(r, grammar=spec) for r in requests(prompts, args.output_len, params, f"g{c}")
            ]
            mask_ms.clear()
            constrained = driver.run(f"json-{c}", constrained_reqs, c)
            full = sorted(mask_ms)
            rows.append({
                "concurrency": c, "free_tok_s": free.tok_s, "constrained_tok_s": constrained.tok_s,
                "cost_pct": 100 * (1 - constrained.tok_s / free.tok_s),
                "mask_ms_median": statistics.median(full), "mask_ms_p99": full[int(0.99 * (len(full) - 1))],
                "decode_step_ms_free": statistics.median(free.decode_ms or free.step_ms),
                "decode_step_ms_constrained": statistics.median(constrained.decode_ms or constrained.step_ms),
                "output_tokens": (free.output_tokens, constrained.output_tokens),
            })  # fmt: skip
    finally:
        driver.close()
    return {
        "dtype": driver.rt.dtype,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "rows": rows,
    }


def report(result: dict) -> str:
    head = (
        f"Constrained decoding ({result['dtype']}, {result['input_len']} prompt + {result['output_len']} output "
        "tokens, JSON-schema string; masks computed on the engine thread during the forward)\n\n"
        "| streams | free tok/s | constrained tok/s | cost | mask ms/step (median / p99) | decode step ms free / constrained |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['concurrency']} | {r['free_tok_s']:.1f} | {r['constrained_tok_s']:.1f} | {r['cost_pct']:.1f}% | "
        f"{r['mask_ms_median']:.3f} / {r['mask_ms_p99']:.3f} | "
        f"{r['decode_step_ms_free']:.1f} / {r['decode_step_ms_constrained']:.1f} |"
        for r in result["rows"]
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench structured", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=Settings().model)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(report(result))
    bad = [r for r in result["rows"] if r["output_tokens"][0] != r["output_tokens"][1]]
    if bad:
        print(f"bench structured: free and constrained runs made different token counts: {bad}")
        return 1
    return 0
