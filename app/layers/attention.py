"""Attention over a paged KV cache, for a ragged batch of prefill chunks and decode tokens.

Two paths compute the same attention. With the C++ kernels (`KernelAttention`), one call attends
every row of the step, reading K/V blocks in place: row t at position p attends positions 0..p of
its sequence, exactly as its decode step would, in the kernel's fixed reduction order, so a row's
result depends on nothing but its sequence. The torch path below is the reference and fallback.

Each path keeps the cache in its own layout (app/worker/runner.allocate_kv): the torch path as
[num_slots, kv_heads, head_dim] (slot = block * block_size + offset), the kernels with each block's
keys transposed (`CpuKernels.kv_views`), so that a long context streams through attention at
memory speed. Each step the runner computes, once for all layers, where the new tokens' K/V go
(`slot_mapping`) and which slots hold each sequence's context (`context_slots`).

Batch invariance (what the engine's runner asks for): a token's result must not depend on its
batch neighbours, nor on how its sequence was cut into chunks (chunked prefill, preemption by
recompute and prefix-cache hits all change the cut). Sequences are always attended one by one;
with `batch_invariant` every query row is also attended on its own, over exactly the keys it may
see (positions 0..p, no mask): the same call, with the same shapes, as the decode step of
position p makes. One SDPA over a whole chunk with a causal mask is cheaper but rounds differently
by chunk length (up to 1e-6 between chunk sizes), which flips near-ties. The row loop costs about
17 µs per prompt token and layer (~25% of a prefill step measured on the default model) and
nothing at decode. Rows past the real tokens, if a caller adds any, are padding: they write no KV
and attend to nothing."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from app.kernels import CpuKernels


@dataclass
class SeqSpan:
    """One sequence's tokens in the flat batch and its whole context in the cache."""

    start: int  # first token of this sequence in the flat batch
    end: int
    context_slots: torch.Tensor  # long [context_len]: cache slots of positions 0..context_len-1
    causal_mask: torch.Tensor | None = None  # bool [q, context_len]: multi-row spans, not batch-invariant


@dataclass
class KernelAttention:
    """What the kernel path needs, as tensors built once per step for every layer."""

    kernels: CpuKernels
    slots: torch.Tensor  # long [rows]: cache slot of each row's new K/V, -1 for padding rows
    tables: torch.Tensor  # int32 [sequences, max blocks]: block tables, zero-padded
    row_seq: torch.Tensor  # int32 [rows]: the row's sequence (index into tables)
    row_len: torch.Tensor  # int32 [rows]: positions the row attends (its position + 1; 0: padding)
    block_size: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # long [num_tokens]: cache slot for each real token's K/V
    spans: list[SeqSpan]
    batch_invariant: bool = False  # attend every query row on its own (see the module docstring)
    kernel: KernelAttention | None = None  # set: the C++ kernels attend (spans unused)


def build_kernel_metadata(
    query_lens: list[int],
    start_positions: list[int],
    block_tables: list[tuple[int, ...]],
    block_size: int,
    kernels: CpuKernels,
    num_rows: int,
) -> AttentionMetadata:
    """Per-row metadata for the kernel path (rows past the real tokens are padding), built with
    array operations: no Python loop over the step's sequences or rows."""
    seqs = len(query_lens)
    q = np.asarray(query_lens, dtype=np.int64)
    n = int(q.sum())
    widths = np.fromiter(map(len, block_tables), dtype=np.int64, count=seqs)
    tables = np.zeros((seqs, int(widths.max(initial=0)) or 1), dtype=np.int32)
    tables[np.arange(tables.shape[1]) < widths[:, None]] = np.fromiter(
        chain.from_iterable(block_tables), dtype=np.int32, count=int(widths.sum())
    )
    seq = np.repeat(np.arange(seqs, dtype=np.int32), q)  # each real row's sequence
    pos = np.asarray(start_positions, dtype=np.int64)[seq] + np.arange(n) - np.repeat(np.cumsum(q) - q, q)
    row_seq = np.zeros(num_rows, dtype=np.int32)
    row_len = np.zeros(num_rows, dtype=np.int32)
    slots = np.full(num_rows, -1, dtype=np.int64)
    row_seq[:n], row_len[:n] = seq, pos + 1
    slots[:n] = tables[seq, pos // block_size].astype(np.int64) * block_size + pos % block_size
    slots_t = torch.from_numpy(slots)
    kernel = KernelAttention(
        kernels,
        slots_t,
        torch.from_numpy(tables),
        torch.from_numpy(row_seq),
        torch.from_numpy(row_len),
        block_size,
    )
    return AttentionMetadata(slots_t[:n], [], True, kernel)


def build_spans(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[tuple[int, ...]],
    block_size: int,
    batch_invariant: bool = False,
) -> AttentionMetadata:
    """Slots (and masks) for a ragged batch; shared by every layer of the step."""
    spans, slot_parts, start = [], [], 0
    for q, ctx, table in zip(query_lens, context_lens, block_tables, strict=False):
        blocks = torch.tensor(table, dtype=torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]
        mask = None
        if q > 1 and not batch_invariant:
            # query i sits at position ctx - q + i and sees keys 0 .. ctx - q + i
            mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - q, ctx)[:, None]
        spans.append(SeqSpan(start, start + q, slots, mask))
        slot_parts.append(slots[ctx - q :])
        start += q
    return AttentionMetadata(torch.cat(slot_parts), spans, batch_invariant)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] for the new tokens (T may include padding rows) -> [T, Hq, D]."""
    k_cache, v_cache = kv_cache
    if meta.kernel is not None:
        m = meta.kernel
        m.kernels.kv_write(k, v, m.slots, k_cache, v_cache)
        return m.kernels.attention(q, k_cache, v_cache, m.tables, m.row_seq, m.row_len, m.block_size, scale)
    n = meta.slot_mapping.numel()
    k_cache.index_copy_(0, meta.slot_mapping, k[:n])
    v_cache.index_copy_(0, meta.slot_mapping, v[:n])
    out = torch.empty_like(q)
    out[n:] = 0.0
    threads = torch.get_num_threads()
    # One thread: each call is small, so a parallel region costs more than it saves (and far more
    # when the cores are shared: 3 vs 10-50 ms per 128 rows measured); and a q = 1 call splits its
    # keys across threads, so its rounding depends on the thread count, which must never change.
    torch.set_num_threads(1)
    try:
        for span in meta.spans:
            ctx, rows = span.context_slots.numel(), span.end - span.start
            qs = q[span.start : span.end].transpose(0, 1)[None]  # [1, Hq, rows, D]
            # index_select, not k_cache[slots]: the same copy, 4x faster (advanced indexing's kernel
            # costs ~19 µs per gather; at batch 16 that was a quarter of the decode step)
            ks = k_cache.index_select(0, span.context_slots).transpose(0, 1)[None]  # [1, Hkv, ctx, D]
            vs = v_cache.index_select(0, span.context_slots).transpose(0, 1)[None]
            if rows == 1 or not meta.batch_invariant:
                o = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=span.causal_mask, scale=scale, enable_gqa=True
                )
                out[span.start : span.end] = o[0].transpose(0, 1)
                continue
            for i in range(rows):
                p = ctx - rows + i + 1  # keys row i sees: exactly its decode step's
                o = F.scaled_dot_product_attention(
                    qs[:, :, i : i + 1], ks[:, :, :p], vs[:, :, :p], scale=scale, enable_gqa=True
                )
                out[span.start + i] = o[0, :, 0]
    finally:
        torch.set_num_threads(threads)
    return out
