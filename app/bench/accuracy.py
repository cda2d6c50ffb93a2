"""`shardserve bench accuracy`: each compute path's logits against fp32, on real prompts.

For every (dtype, compute path, KV cache dtype) the relative L2 error of the prompt's logits against
`--dtype fp32` on the torch path, and how often the greedy token agrees, position by position. The
KV cache's dtype matters because every prompt token's K/V is written to it and read back."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from app.kernels import CpuKernels, available_isas
from app.layers.attention import build_kernel_metadata, build_spans
from app.layers.parallel import TPContext
from app.model.loader import LoadedModel, load_model
from app.model.store import ensure_model
from app.settings import Settings
from app.tokenizer.tokenizer import Tokenizer
from app.worker.comm import SingleCommunicator
from app.worker.runner import allocate_kv

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which green plants",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 17 times 23?<|im_end|>\n<|im_start|>assistant\n",
)


def prompt_logits(loaded: LoadedModel, ids: list[int], kv_dtype: torch.dtype) -> torch.Tensor:
    """Logits at every position of one prompt computed in one prefill over a fresh paged cache."""
    model = loaded.model
    n, bs = len(ids), 16
    blocks = tuple(range(-(-n // bs)))
    _, caches = allocate_kv(loaded, len(blocks), bs, kv_dtype)
    if loaded.kernels is not None:
        meta = build_kernel_metadata([n], [0], [blocks], bs, loaded.kernels, n)
    else:
        meta = build_spans([n], [n], [blocks], bs, batch_invariant=True)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), caches, meta))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=Settings().model)
    args = p.parse_args(argv)
    path = ensure_model(args.model, Settings().home)
    tok = Tokenizer.load(path)
    prompts = [tok.encode(t) for t in PROMPTS]

    def load(dtype: str, kernels: CpuKernels | None) -> LoadedModel:
        return load_model(Path(path), dtype, TPContext(0, 1), SingleCommunicator(), kernels=kernels)

    torch.set_num_threads(2)
    ref_model = load("fp32", None)
    refs = [prompt_logits(ref_model, ids, torch.float32) for ids in prompts]
    builds = [CpuKernels(isa, 2) for isa in available_isas()]
    cases = [("int8", None, torch.float32)]
    if builds:
        # int8 on each build (avx512vnni's int8 activations differ); other dtypes compute the same
        # on every build
        fp32_act = builds[-1]
        cases += [("int8", fp32_act, torch.float32)]
        cases += [("int8", k, torch.float16) for k in builds]
        cases += [("bf16", fp32_act, torch.float16), ("fp16", fp32_act, torch.float16),
                  ("fp32", fp32_act, torch.float32)]  # fmt: skip
    print(f"model {Path(path).name}, {len(prompts)} prompts, {sum(map(len, prompts))} positions\n")
    print("| dtype | path | KV cache | mean rel. error | max | greedy agreement |\n|---|---|---|---|---|---|")
    for dtype, k, kv in cases:
        model = load(dtype, k)
        errors, agree, total = [], 0, 0
        for ids, ref in zip(prompts, refs, strict=True):
            got = prompt_logits(model, ids, kv)
            errors.append(((got - ref).norm() / ref.norm()).item())
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[0]
        path_name = f"kernels ({k.isa})" if k is not None else "torch"
        kv_name = "fp16" if kv == torch.float16 else "fp32"
        print(f"| {dtype} | {path_name} | {kv_name} | {100 * sum(errors) / len(errors):.2f}% | "
              f"{100 * max(errors):.2f}% | {agree}/{total} |")  # fmt: skip
    return 0
