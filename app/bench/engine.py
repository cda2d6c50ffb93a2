"""`shardserve bench engine`: the engine without HTTP, per dtype, in one run.

1. Throughput: for each concurrency c, c requests of --input-len random prompt tokens and
   --output-len output tokens (ignore_eos) submitted at once: output tokens/s, mean step time, the
   median full-batch decode step, TTFT, KV blocks in use after every step (peak and a sparkline).
2. The same --baseline requests one after another: the sequential baseline and batching's speed-up.
3. A shared-system-prompt workload: the prefix cache's hit rate (prompt tokens served from cache).
4. The model's linear layers alone (its QuantLinear modules, loaded again in this process) on
   random input of a batch-16 decode step's shape: the step / linears ratio (target <= 1.3).

Everything runs through build_stack, as `serve` does, but the engine is stepped synchronously
with Engine.run_once(), so only the engine is measured. The prefix cache is reset before each run:
no run's prompts hit blocks another run left behind."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from app.engine.types import GenerateRequest, RequestOutput, SamplingParams, StepStats
from app.layers.embedding import VocabParallelEmbedding
from app.layers.linear import QuantLinear
from app.layers.parallel import TPContext
from app.model.loader import load_model
from app.settings import Settings
from app.stack import Stack, build_stack
from app.worker.comm import SingleCommunicator

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class Run:
    """One workload through the engine; times in ms unless named _s."""

    name: str
    concurrency: int
    requests: int
    output_tokens: int = 0
    wall_s: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)  # steps that were all decodes, c of them
    ttft_s: list[float] = field(default_factory=list)
    kv_used: list[int] = field(default_factory=list)  # blocks held after each step
    kv_total: int = 0
    preemptions: int = 0
    prefix_hit_rate: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict:
        med = statistics.median
        return {
            "run": self.name, "concurrency": self.concurrency, "requests": self.requests,
            "output_tok_s": self.tok_s, "mean_step_ms": statistics.fmean(self.step_ms),
            "decode_step_ms": med(self.decode_ms) if self.decode_ms else float("nan"),
            "ttft_mean_s": statistics.fmean(self.ttft_s), "ttft_p50_s": med(self.ttft_s),
            "ttft_max_s": max(self.ttft_s), "kv_peak": max(self.kv_used), "kv_total": self.kv_total,
            "kv_over_time": sparkline(self.kv_used, self.kv_total), "preemptions": self.preemptions,
            "prefix_hit_rate": self.prefix_hit_rate, "wall_s": self.wall_s,
        }  # fmt: skip


def sparkline(values: list[int], top: int, width: int = 24) -> str:
    if not values:
        return ""
    picks = [values[i * len(values) // width] for i in range(min(width, len(values)))]
    return "".join(SPARK[min(len(SPARK) - 1, v * len(SPARK) // max(1, top))] for v in picks)


class Driver:
    """Owns a Stack whose engine it steps itself; collects outputs and step stats by hook."""

    def __init__(self, settings: Settings) -> None:
        self.outputs: list[RequestOutput] = []
        self.steps: list[StepStats] = []
        self.rt: Stack = build_stack(settings, on_outputs=self.outputs.extend, on_step=self.steps.append)
        self.rt.pool.start()

    def close(self) -> None:
        self.rt.pool.shutdown()

    def run(self, name: str, requests: list[GenerateRequest], concurrency: int) -> Run:
        """Keep `concurrency` requests in flight until all are done."""
        engine, bm = self.rt.engine, self.rt.engine.block_manager
        bm.reset_prefix_cache()
        hits0, queries0, pre0 = bm.prefix_hits, bm.prefix_queries, engine.scheduler.preemptions_total
        run = Run(name, concurrency, len(requests), kv_total=bm.num_blocks)
        pending, started, first, done = list(requests), {}, set(), 0
        t0 = time.perf_counter()
        while done < len(requests):
            while pending and len(started) - done < concurrency:
                req = pending.pop(0)
                started[req.request_id] = time.perf_counter()
                engine.add_request(replace(req, arrival_time=time.monotonic()))
            self.outputs.clear()
            self.steps.clear()
            engine.run_once()
            now = time.perf_counter()
            for s in self.steps:
                run.step_ms.append(s.duration * 1000)
                if s.num_seqs == s.num_tokens == min(concurrency, len(requests)):
                    run.decode_ms.append(s.duration * 1000)
            for out in self.outputs:
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                if out.token_ids and out.request_id not in first:
                    first.add(out.request_id)
                    run.ttft_s.append(now - started[out.request_id])
                run.output_tokens += len(out.token_ids)
                done += out.finish_reason is not None
            run.kv_used.append(bm.num_used_blocks)
        run.wall_s = time.perf_counter() - t0
        run.preemptions = engine.scheduler.preemptions_total - pre0
        run.prefix_hit_rate = (bm.prefix_hits - hits0) / max(1, bm.prefix_queries - queries0)
        return run


def random_prompts(driver: Driver, count: int, length: int, seed: int) -> list[list[int]]:
    tok, rng = driver.rt.tokenizer, random.Random(seed)
    vocab = [i for i in range(driver.rt.card.vocab_size) if not tok.is_special(i)]
    return [[rng.choice(vocab) for _ in range(length)] for _ in range(count)]


def requests(
    prompts: list[list[int]], output_len: int, params: SamplingParams, tag: str
) -> list[GenerateRequest]:
    params = replace(params, max_tokens=output_len)
    return [GenerateRequest(f"{tag}-{i}", tuple(p), params, 0.0) for i, p in enumerate(prompts)]


def linears_ms(rt: Stack, batch: int, repeat: int) -> float:
    """Median time of every linear layer a decode step runs (qkv, o, gate_up, down per layer and the
    LM head), on the model's own QuantLinear modules, input [batch, in_features] of random values."""
    loaded = load_model(rt.model_path, rt.dtype, TPContext(0, 1), SingleCommunicator())
    model = loaded.model
    head = model.lm_head.table
    mods = [
        m for m in model.modules()
        if isinstance(m, QuantLinear) and (not isinstance(m, VocabParallelEmbedding) or m is head)
    ]  # fmt: skip
    xs = {m.in_features: torch.randn(batch, m.in_features) for m in mods}
    times = []
    with torch.inference_mode():
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            for m in mods:
                m.linear(xs[m.in_features])
            if i:  # the first pass warms caches and kernels up
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_dtype(args: argparse.Namespace, dtype: str) -> dict:
    conc = sorted(set(args.concurrency))
    most = max([*conc, args.baseline, 1])
    kv_tokens = args.kv_cache_tokens or most * (args.input_len + args.output_len + 16) + 16
    settings = Settings(
        model=args.model, dtype=dtype, tp=args.tp, max_num_seqs=most, kv_cache_tokens=kv_tokens,
        max_model_len=args.input_len + args.output_len + 16,  # what each request needs: the cache holds it
        max_num_batched_tokens=max(args.max_num_batched_tokens, most), seed=args.seed,
        **({"home": args.home} if args.home else {}),
    )  # fmt: skip
    params = SamplingParams(temperature=args.temperature, ignore_eos=True)
    driver = Driver(settings)
    result: dict = {"dtype": driver.rt.dtype, "kv_cache_tokens": kv_tokens, "runs": []}
    try:
        warm = random_prompts(driver, 2, 16, seed=-1)
        driver.run("warm-up", requests(warm, 4, params, "warm"), 2)
        runs: dict[int, Run] = {}
        for c in conc:
            prompts = random_prompts(driver, c, args.input_len, seed=c)
            runs[c] = driver.run(f"c{c}", requests(prompts, args.output_len, params, f"c{c}"), c)
            result["runs"].append(runs[c].summary() | {"kv_used": runs[c].kv_used})
            print(f"  {dtype} c={c}: {runs[c].tok_s:.1f} tok/s", flush=True)
        if args.baseline:
            b = args.baseline
            prompts = random_prompts(driver, b, args.input_len, seed=b)  # the c=b run's prompts
            if b not in runs:
                runs[b] = driver.run(f"c{b}", requests(prompts, args.output_len, params, f"c{b}"), b)
                result["runs"].append(runs[b].summary() | {"kv_used": runs[b].kv_used})
            seq = driver.run("sequential", requests(prompts, args.output_len, params, "seq"), 1)
            result["sequential"] = seq.summary()
            result["speedup"] = runs[b].tok_s / seq.tok_s
            print(f"  {dtype} sequential: {seq.tok_s:.1f} tok/s", flush=True)
        if args.prefix_requests:
            system = random_prompts(driver, 1, args.input_len, seed=-2)[0]
            users = random_prompts(driver, args.prefix_requests, 16, seed=-3)
            shared = requests([system + u for u in users], min(16, args.output_len), params, "prefix")
            result["prefix"] = driver.run("prefix", shared, args.prefix_requests).summary()
        decode_batch = args.baseline or max(conc)
        if args.tp == 1 and decode_batch in runs and runs[decode_batch].decode_ms:
            step = statistics.median(runs[decode_batch].decode_ms)
            lin = linears_ms(driver.rt, decode_batch, repeat=10)
            result["step_vs_linears"] = {"batch": decode_batch, "step_ms": step, "linears_ms": lin,
                                         "ratio": step / lin}  # fmt: skip
    finally:
        driver.close()
    return result


def _fmt(v: object) -> str:
    return (
        f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else f"{v:.1f}" if isinstance(v, float) else str(v)
    )


def _table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def report(results: list[dict], args: argparse.Namespace, loads: tuple[float, float]) -> str:
    runs = [{"dtype": r["dtype"], **run} for r in results for run in r["runs"]]
    cols = ["dtype", "concurrency", "output_tok_s", "mean_step_ms", "decode_step_ms", "ttft_mean_s",
            "ttft_max_s", "kv_peak", "kv_total", "kv_over_time", "preemptions", "wall_s"]  # fmt: skip
    out = [
        f"## shardserve bench engine\n\nmodel {args.model}, tp {args.tp}, prompt {args.input_len} + "
        f"output {args.output_len} tokens (ignore_eos, temperature {args.temperature}), "
        f"max_num_batched_tokens {args.max_num_batched_tokens}, {torch.get_num_threads()} threads; "
        f"1-minute load average {loads[0]:.1f} before, {loads[1]:.1f} after (other processes on these "
        "cores slow every parallel region: compare figures only within one run)\n",
        _table(runs, cols) + "\n",
    ]
    summary = []
    for r in results:
        row = {"dtype": r["dtype"]}
        if "sequential" in r:
            row |= {"sequential_tok_s": r["sequential"]["output_tok_s"], "speedup": r["speedup"]}
        if "prefix" in r:
            row |= {
                "prefix_hit_rate": r["prefix"]["prefix_hit_rate"],
                "prefix_ttft_mean_s": r["prefix"]["ttft_mean_s"],
            }
        if "step_vs_linears" in r:
            s = r["step_vs_linears"]
            row |= {
                "batch": s["batch"],
                "step_ms": s["step_ms"],
                "linears_ms": s["linears_ms"],
                "step/linears": s["ratio"],
            }
        summary.append(row)
    cols = ["dtype", "sequential_tok_s", "speedup", "prefix_hit_rate", "prefix_ttft_mean_s", "batch", "step_ms",
            "linears_ms", "step/linears"]  # fmt: skip
    out += ["### Batching speed-up, prefix cache, step vs linear layers\n", _table(summary, cols)]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="shardserve bench engine", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--home", type=Path, default=None, help="model cache (default: SHARDSERVE_HOME)")
    p.add_argument("--dtype", nargs="+", default=["auto"], help="one or more of auto fp32 bf16 fp16 int8")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--baseline", type=int, default=16, help="requests run one by one for the speed-up (0: skip)"
    )
    p.add_argument("--prefix-requests", type=int, default=16, help="shared-system-prompt requests (0: skip)")
    p.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="default: enough for every request")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every figure (and KV series) here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp))  # as each rank does
    load0 = os.getloadavg()[0]
    results = [bench_dtype(args, d) for d in args.dtype]
    print(report(results, args, (load0, os.getloadavg()[0])))
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
        )
    return 0
