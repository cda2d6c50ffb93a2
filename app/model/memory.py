"""What a model costs in memory, from its config alone: one place for start-up, metrics and inspect."""

from __future__ import annotations

from app.layers.parallel import head_split
from app.model.config import ModelConfig

KV_DTYPE_BYTES = 4  # the KV cache is kept in fp32 on CPU (attention computes in fp32)


def kv_bytes_per_token(config: ModelConfig, tp: int, rank: int, dtype_bytes: int = KV_DTYPE_BYTES) -> int:
    """K and V of one token on one rank, over all layers (replicated KV heads counted per rank)."""
    kv_heads = head_split(config.num_heads, config.num_kv_heads, tp)[rank].kv_count
    return 2 * config.num_layers * kv_heads * config.head_dim * dtype_bytes


def kv_blocks_for_budget(
    config: ModelConfig, tp: int, block_size: int, budget_bytes: int, dtype_bytes: int = KV_DTYPE_BYTES
) -> int:
    """How many KV blocks fit in `budget_bytes` summed over all ranks of this machine."""
    per_token = sum(kv_bytes_per_token(config, tp, r, dtype_bytes) for r in range(tp))
    return max(0, budget_bytes // (per_token * block_size))
