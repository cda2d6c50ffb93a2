"""Driving a loaded model or a worker pool by hand, for tests that compare them with transformers.

Shared by the model, family, inspect and pool tests: a forward over a whole sequence (in one
prefill or in chunks, through a scrambled block table), greedy decoding by recomputation, one
rank's shard loaded alone, and a pool driven with hand-made step plans."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from app.engine.types import SamplingParams, SeqChunk, SeqSampling, StepPlan
from app.kernels import CpuKernels
from app.layers.attention import build_kernel_metadata, build_spans
from app.layers.parallel import TPContext
from app.model.costs import NoComm
from app.model.loader import LoadedModel, load_model
from app.settings import Settings
from app.worker.comm import SingleCommunicator
from app.worker.pool import WorkerPool
from app.worker.runner import allocate_kv


def load_ours(path: Path, dtype: str = "fp32", kernels: CpuKernels | None = None) -> LoadedModel:
    return load_model(path, dtype, TPContext(0, 1), SingleCommunicator(), kernels=kernels)


def logits(loaded: LoadedModel, ids: torch.Tensor, chunks: list[int] | None = None) -> torch.Tensor:
    """Full-sequence logits, computed in one prefill or in the given chunk sizes."""
    model = loaded.model
    n, bs = len(ids), 16
    blocks = tuple(reversed(range(-(-n // bs))))  # a scrambled block table: paging must not matter
    _, caches = allocate_kv(loaded, len(blocks), bs, torch.float32)
    out, start = [], 0
    with torch.no_grad():
        for size in chunks or [n]:
            end = start + size
            if loaded.kernels is not None:
                meta = build_kernel_metadata([size], [start], [blocks], bs, loaded.kernels, size)
            else:
                meta = build_spans([size], [end], [blocks], bs)
            hidden = model(ids[start:end], torch.arange(start, end), caches, meta)
            out.append(model.compute_logits(hidden))
            start = end
    return torch.cat(out)


def hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


def greedy(loaded: LoadedModel, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):  # recompute from scratch: checks the model, not the cache bookkeeping
        ids.append(int(logits(loaded, torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt) :]


def load_rank(path: Path, dtype: str, tp: int, rank: int) -> LoadedModel:
    """One rank's shard, loaded in this process (no pool, no collective)."""
    return load_model(path, dtype, TPContext(rank, tp), NoComm(rank, tp))


def small_pool(path: Path, tp: int, dtype: str = "fp32") -> WorkerPool:
    return WorkerPool(Settings(tp=tp, block_size=16, max_num_batched_tokens=64), path, dtype, num_blocks=8)


def pool_greedy(pool: WorkerPool, prompt: list[int], steps: int, logprobs: int = 5) -> tuple[list[int], list]:
    """Greedy tokens and each step's top logprobs, driving the pool with hand-made plans."""
    params = SamplingParams(temperature=0.0, max_tokens=steps, logprobs=logprobs)
    table = tuple(range(4))
    new = (SeqSampling.of(0, params, 0, tuple(prompt), ()),)
    chunk = SeqChunk(0, tuple(prompt), 0, table, True, 0)
    tokens, tops = [], []
    for step in range(steps):
        out = pool.execute(StepPlan(step, (chunk,), new if step == 0 else ()))
        tok = out.tokens[0]
        tokens.append(tok.token_id)
        tops.append(tok.top_logprobs)
        chunk = SeqChunk(0, (tok.token_id,), len(prompt) + step, table, True, step + 1)
    return tokens, tops
