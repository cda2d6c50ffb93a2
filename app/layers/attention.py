"""Attention over a paged KV cache, for a ragged batch of prefill chunks and decode tokens.

The cache of one layer is two tensors [num_slots, kv_heads, head_dim] (slot = block * block_size
+ offset). Each step the runner computes, once for all layers, where the new tokens' K/V go
(`slot_mapping`) and which slots hold each sequence's context (`context_slots`).

Every sequence is attended on its own, with the same ops whatever else is in the batch: a token's
result then does not depend on its batch neighbours (batched output equals the output alone)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqSpan:
    """One sequence's tokens in the flat batch and its whole context in the cache."""

    start: int  # first token of this sequence in the flat batch
    end: int
    context_slots: torch.Tensor  # long [context_len]: cache slots of positions 0..context_len-1
    causal_mask: torch.Tensor | None  # bool [q, context_len], None when q == 1 (attend everything)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # long [num_tokens]: cache slot for each new token's K/V
    spans: list[SeqSpan]


def build_spans(
    query_lens: list[int], context_lens: list[int], block_tables: list[tuple[int, ...]], block_size: int
) -> AttentionMetadata:
    """Slots and masks for a ragged batch; shared by every layer of the step."""
    spans, slot_parts, start = [], [], 0
    for q, ctx, table in zip(query_lens, context_lens, block_tables, strict=False):
        blocks = torch.tensor(table, dtype=torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]
        mask = None
        if q > 1:
            # query i sits at position ctx - q + i and sees keys 0 .. ctx - q + i
            qpos = torch.arange(ctx - q, ctx)[:, None]
            mask = torch.arange(ctx)[None, :] <= qpos
        spans.append(SeqSpan(start, start + q, slots, mask))
        slot_parts.append(slots[ctx - q :])
        start += q
    return AttentionMetadata(torch.cat(slot_parts), spans)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] for the new tokens -> [T, Hq, D]."""
    k_cache, v_cache = kv_cache
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    for span in meta.spans:
        qs = q[span.start : span.end].transpose(0, 1)[None]  # [1, Hq, q, D]
        ks = k_cache[span.context_slots].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
        vs = v_cache[span.context_slots].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=span.causal_mask, scale=scale, enable_gqa=True
        )
        out[span.start : span.end] = o[0].transpose(0, 1)
    return out
