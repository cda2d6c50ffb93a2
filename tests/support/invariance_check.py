"""Batch invariance of one rank's forward, checked in a process of its own.

Run as a script, so that MKL's instruction set (MKL_ENABLE_INSTRUCTIONS), the thread count and the
compute path are fixed before torch loads: `tests/e2e/test_invariance.py` runs it over that grid.

    python -m tests.support.invariance_check MODEL_DIR --kernels torch --threads 2 --dtype fp32 int8

For each dtype: every sequence is first computed alone (its whole prompt in one chunk, then decode
steps), then all of them together, in two orders, with their prompts cut into chunks of different
sizes that share steps with other sequences' chunks and decode rows, in other KV blocks. Every
logits row of the batched runs must equal, bitwise, the same row computed alone. Prints
`ok: ...` and exits 0, or prints the first difference and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

BLOCK = 16
PROMPT_LENS = (1, 5, 17, 40, 70)
DECODE_STEPS = 4
CHUNKS = (3, 16, 7, 64, 11)  # per sequence, in the batched run


SET_BLOCKS = sum(-(-(n + DECODE_STEPS) // BLOCK) for n in PROMPT_LENS)  # one KV block set


def _runner(model: Path, dtype: str, kernels_choice: str, threads: int):
    from app.kernels import load_kernels
    from app.layers.parallel import TPContext
    from app.model.loader import load_model
    from app.model.memory import kv_cache_dtype
    from app.worker.comm import SingleCommunicator
    from app.worker.runner import ModelRunner

    kernels = load_kernels(kernels_choice, threads)
    torch.set_num_threads(1 if kernels is not None else threads)
    loaded = load_model(model, dtype, TPContext(0, 1), SingleCommunicator(), kernels=kernels)
    kv = (
        torch.float16 if kv_cache_dtype(dtype, kernels is not None) == "fp16" else torch.float32
    )  # as the ranks
    return ModelRunner(loaded, num_blocks=3 * SET_BLOCKS, block_size=BLOCK, is_driver=False, kv_dtype=kv)


def _tables(first_block: int) -> list[tuple[int, ...]]:
    tables, b = [], first_block
    for n in PROMPT_LENS:
        count = -(-(n + DECODE_STEPS) // BLOCK)
        tables.append(tuple(range(b, b + count)))
        b += count
    return tables


def _alone(runner, prompts: list[list[int]]) -> tuple[list[list[int]], dict]:
    """Each sequence alone; returns the greedy continuations and {(seq, position): logits}."""
    from app.engine.types import SeqChunk, StepPlan

    tables = _tables(0)
    conts, ref = [], {}
    for s, prompt in enumerate(prompts):
        tokens, pos, cont = list(prompt), 0, []
        for _ in range(DECODE_STEPS + 1):
            chunk = SeqChunk(s, tuple(tokens[pos:]), pos, tables[s], True)
            logits = runner.logits(StepPlan(0, (chunk,)))[0]
            pos = len(tokens)
            ref[(s, pos)] = logits.clone()
            nxt = int(logits.argmax())
            tokens.append(nxt)
            cont.append(nxt)
        conts.append(cont)
    return conts, ref


def _batched(
    runner, prompts: list[list[int]], conts: list[list[int]], order: list[int], first_block: int
) -> dict:
    from app.engine.types import SeqChunk, StepPlan

    tables = _tables(first_block)
    full = [p + c for p, c in zip(prompts, conts, strict=True)]
    done = [0] * len(prompts)  # positions computed
    got = {}
    while any(done[s] < len(full[s]) - 1 for s in order):
        chunks = []
        for s in order:
            end_prompt = len(prompts[s])
            if done[s] >= len(full[s]) - 1:
                continue
            n = min(CHUNKS[s], end_prompt - done[s]) if done[s] < end_prompt else 1
            upto = done[s] + n
            chunks.append(SeqChunk(s, tuple(full[s][done[s] : upto]), done[s], tables[s], upto >= end_prompt))
        logits = runner.logits(StepPlan(0, tuple(chunks)))
        row = 0
        for c in chunks:
            done[c.seq_id] += len(c.token_ids)
            if c.sample:
                got[(c.seq_id, done[c.seq_id])] = logits[row].clone()
                row += 1
    return got


def check(model: Path, dtype: str, kernels_choice: str, threads: int) -> str | None:
    """None when invariant, else a description of the first difference."""
    runner = _runner(model, dtype, kernels_choice, threads)
    vocab = runner.loaded.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    conts, ref = _alone(runner, prompts)
    n = len(prompts)
    # each batched run in KV blocks of its own: where a sequence's cache lives must not matter
    for order, first in ((list(range(n)), SET_BLOCKS), (list(reversed(range(n))), 2 * SET_BLOCKS)):
        got = _batched(runner, prompts, conts, order, first_block=first)
        assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
        for key, want in ref.items():
            if not torch.equal(got[key], want):
                diff = (got[key] - want).abs().max().item()
                return f"{dtype}: sequence {key[0]} position {key[1]} differs by {diff:.3g} (order {order})"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16", "fp16", "int8"])
    args = p.parse_args(argv)
    from app.kernels import resolve

    path = resolve(args.kernels)
    for dtype in args.dtype:
        problem = check(args.model, dtype, args.kernels, args.threads)
        if problem:
            print(f"NOT INVARIANT ({path}, {args.threads} threads): {problem}")
            return 1
    print(f"ok: {path}, {args.threads} threads, {' '.join(args.dtype)}: batched == alone, bitwise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
