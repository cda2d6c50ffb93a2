"""`shardserve bench kernels`: linear kernels at the model's shapes, all-reduce, decode steps.

Three tables, all measured in one run so their ratios are comparable on a noisy machine:
1. every linear layer of one decode step (30 layers x qkv/o/gate_up/down + lm_head, distinct
   weights so nothing stays in cache) per weight format and batch size: our kernels (app/kernels,
   each ISA build this CPU runs) beside ATen's batched library calls (MKL, oneDNN, the int8 pack
   kernel), which are not batch-invariant and serve only as the yardstick;
2. the all-reduce of one hidden vector between two rank processes, shared memory vs gloo;
3. a full decode step through the worker pool (TP x dtype x batch), KV context 128 tokens."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from app.engine.types import SamplingParams, SeqChunk, SeqSampling, StepPlan
from app.kernels import CpuKernels, available_isas
from app.layers.quant import Float32, Half16, Int8BitsAndBytes, Int8WeightOnlyCPU, WeightFormat, weight_format
from app.model.loader import read_config
from app.model.store import ensure_model
from app.settings import Settings


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


class AtenFloat32(Float32):
    """Yardstick: one batched F.linear (MKL sgemm; rows round differently by batch size)."""

    name = "fp32 ATen F.linear"

    def matmul(self, bufs, x):  # type: ignore[no-untyped-def]
        return torch.nn.functional.linear(x, bufs["weight"])


class AtenBFloat16(Half16):
    """Yardstick: one batched bf16 F.linear (oneDNN; AMX where the CPU has it)."""

    name = "bf16 ATen F.linear (bf16 activations)"

    def __init__(self) -> None:
        super().__init__(torch.bfloat16)

    def matmul(self, bufs, x):  # type: ignore[no-untyped-def]
        return torch.nn.functional.linear(x.to(torch.bfloat16), bufs["weight"]).float()


class AtenInt8Pack(Int8WeightOnlyCPU):
    """Yardstick: one batched `_weight_int8pack_mm` (bf16 activations), the old int8 path."""

    name = "int8 ATen _weight_int8pack_mm"

    def matmul(self, bufs, x):  # type: ignore[no-untyped-def]
        q, scales = bufs["qweight"], bufs["scales"].to(torch.bfloat16)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scales).float()


class Int8DequantFP32(Int8WeightOnlyCPU):
    """Candidate: int8 storage, dequantized to fp32 per call, then sgemm (wins at large M?)."""

    name = "int8→fp32 sgemm"

    def matmul(self, bufs, x):  # type: ignore[no-untyped-def]
        w = bufs["qweight"].float() * bufs["scales"].float()[:, None]
        return torch.nn.functional.linear(x, w)


class BitsAndBytesCPU(Int8BitsAndBytes):
    """Candidate: bitsandbytes' LLM.int8 (threshold 0) through its CPU backend."""

    name = "int8 bitsandbytes (CPU backend)"


def _median_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def linear_table(config, batches: list[int], repeat: int) -> list[dict]:  # type: ignore[no-untyped-def]
    h, i = config.hidden_size, config.intermediate_size
    shapes = [(config.q_size + 2 * config.kv_size, h), (h, config.q_size), (2 * i, h), (h, i)]
    formats: list[WeightFormat] = []
    for isa in available_isas():
        kernels = CpuKernels(isa, torch.get_num_threads())
        for dtype in ("fp32", "bf16", "int8"):
            fmt = weight_format(dtype, kernels=kernels)
            fmt.name = f"{dtype} kernels {isa}"
            formats.append(fmt)
    formats += [AtenFloat32(), AtenBFloat16(), AtenInt8Pack(), Int8DequantFP32(), BitsAndBytesCPU()]
    rows = []
    for fmt in formats:
        layers = []
        for out_f, in_f in shapes * config.num_layers + [(config.vocab_size, h)]:
            bufs = {n: torch.empty(s, dtype=d) for n, (s, d) in fmt.specs(out_f, in_f).items()}
            fmt.store(bufs, 0, torch.randn(out_f, in_f) * 0.02)
            layers.append((bufs, in_f))
        for m in batches:
            xs = {k: torch.randn(m, k) for k in {in_f for _, in_f in layers}}

            def step(layers=layers, xs=xs, fmt=fmt) -> None:
                for bufs, in_f in layers:
                    fmt.matmul(bufs, xs[in_f])

            ms = _median_ms(step, repeat)
            rows.append({"format": fmt.name, "batch": m, "ms": ms, "tok_s": m / ms * 1000})
        del layers
    return rows


def decode_step_table(
    model_path: Path,
    tps: list[int],
    dtypes: list[str],
    batches: list[int],
    repeat: int,
    paths: list[str],
    ctx: int = 128,
) -> list[dict]:
    from app.worker.pool import WorkerPool

    bs, prefill = 16, 512
    rows = []
    for path in paths:
        for tp, dtype in ((tp, dtype) for tp in tps for dtype in dtypes):
            blocks_per_seq = ctx // bs + 1
            num_blocks = max(max(batches) * blocks_per_seq, prefill // bs + 1)
            settings = Settings(tp=tp, block_size=bs, kernels=path,
                                max_num_batched_tokens=max(prefill, ctx, max(batches)))  # fmt: skip
            pool = WorkerPool(settings, model_path, dtype, num_blocks)
            pool.start()
            try:
                params = SamplingParams(temperature=0.0, max_tokens=10**6, ignore_eos=True)
                for b in batches:
                    tables = [tuple(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(b)]
                    new = tuple(SeqSampling.of(s, params, 0, (1,) * ctx, ()) for s in range(b))
                    # prefill each sequence's context once, then time decode steps
                    for s in range(b):
                        pool.execute(
                            StepPlan(0, (SeqChunk(s, (7,) * ctx, 0, tables[s], True, 0),), new[s : s + 1])
                        )
                    chunks = tuple(SeqChunk(s, (7,), ctx, tables[s], True, 1) for s in range(b))
                    ms = _median_ms(
                        lambda chunks=chunks, pool=pool: pool.execute(StepPlan(1, chunks)), repeat
                    )
                    rows.append(
                        {"path": path, "tp": tp, "dtype": dtype, "batch": b, "ms": ms, "tok_s": b / ms * 1000}
                    )
                    pool.execute(StepPlan(2, (), finished_seq_ids=tuple(range(b))))
                # one prompt of `prefill` tokens in one chunk
                table = tuple(range(prefill // bs + 1))
                new = (SeqSampling.of(0, params, 0, (1,) * prefill, ()),)
                chunk = (SeqChunk(0, (7,) * prefill, 0, table, True, 0),)
                ms = _median_ms(
                    lambda c=chunk, n=new, p=pool: p.execute(StepPlan(0, c, n)), max(3, repeat // 3)
                )
                rows.append(
                    {"path": path, "tp": tp, "dtype": dtype, "batch": f"prefill {prefill}", "ms": ms,
                     "tok_s": prefill / ms * 1000}
                )  # fmt: skip
                pool.execute(StepPlan(1, (), finished_seq_ids=(0,)))
            finally:
                pool.shutdown()
    return rows


def _md(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            "| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench kernels")
    p.add_argument("--model", default=Settings().model)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument(
        "--kernels", nargs="+", default=["auto", "torch"], help="compute paths of the decode steps"
    )
    p.add_argument("--skip-steps", action="store_true", help="only kernels and all-reduce")
    p.add_argument("--steps-only", action="store_true", help="only the decode steps")
    p.add_argument("--context", type=int, default=128, help="tokens of context of each decode step")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model_path = ensure_model(args.model, Settings().home)
    config = read_config(model_path)
    print(f"## shardserve bench kernels\n\nmachine: {machine()}\nmodel: {model_path.name}\n")
    report: dict = {"machine": machine(), "model": model_path.name}
    if not args.steps_only:
        report["linear"] = linear_table(config, args.batches, args.repeat)
        print("### All linear layers of one decode step\n")
        print(_md(report["linear"], ["format", "batch", "ms", "tok_s"]) + "\n")

        from app.bench.allreduce import bench_allreduce

        ar = bench_allreduce(2, config.hidden_size, 1000)
        report["allreduce"] = ar
        print(f"### All-reduce of {config.hidden_size} fp32 between 2 ranks (µs)\n")
        print("| backend | median | p90 |\n|---|---|---|")
        for name in ("shm", "gloo"):
            print(f"| {name} | {ar[name]['median_us']:.1f} | {ar[name]['p90_us']:.1f} |")
        print()
    if not args.skip_steps:
        report["decode_step"] = decode_step_table(
            model_path, args.tp, args.dtypes, args.batches, args.repeat, args.kernels, args.context
        )
        print(f"### Decode step through the worker pool (context {args.context})\n")
        print(_md(report["decode_step"], ["path", "tp", "dtype", "batch", "ms", "tok_s"]) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
