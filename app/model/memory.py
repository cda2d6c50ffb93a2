"""What a model costs in memory, from its config alone: one place for start-up, metrics and inspect."""

from __future__ import annotations

import ctypes
import os

from app.layers.parallel import head_split
from app.model.config import ModelConfig

KV_DTYPE_BYTES = 4  # fp32, the torch path's and --dtype fp32's KV cache
KV_BYTES = {"fp32": 4, "fp16": 2}


def kv_cache_dtype(weight_dtype: str, kernels: bool) -> str:
    """The KV cache's dtype: fp16 under our C++ kernels for the int8 and 16-bit weight dtypes (decode
    at a long context reads the whole cache every step: half the bytes; attention still computes
    in fp32), fp32 for `--dtype fp32` (the mode that must equal transformers) and the torch path."""
    return "fp16" if kernels and weight_dtype != "fp32" else "fp32"


def kv_bytes_per_token(config: ModelConfig, tp: int, rank: int, dtype_bytes: int = KV_DTYPE_BYTES) -> int:
    """K and V of one token on one rank, over all layers (replicated KV heads counted per rank)."""
    kv_heads = head_split(config.num_heads, config.num_kv_heads, tp)[rank].kv_count
    return 2 * config.num_layers * kv_heads * config.head_dim * dtype_bytes


def kv_blocks_for_budget(
    config: ModelConfig,
    tp: int,
    block_size: int,
    budget_bytes: int,
    dtype_bytes: int = KV_DTYPE_BYTES,
    *,
    per_rank: bool = False,
) -> int:
    """How many KV blocks fit in `budget_bytes` summed over all ranks of this machine, or (per_rank,
    vLLM's per-GPU --kv-cache-memory-bytes) in each rank's own, where the rank holding the most KV
    heads decides."""
    sizes = [kv_bytes_per_token(config, tp, r, dtype_bytes) for r in range(tp)]
    per_token = max(sizes) if per_rank else sum(sizes)
    return max(0, budget_bytes // (per_token * block_size))


def resident_bytes(address: int, nbytes: int) -> int | None:
    """How much of [address, address + nbytes) is in RAM (mincore): a reservation such as the KV
    cache costs memory only as its pages are first written. None where mincore is not available."""
    if nbytes <= 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = address - address % page
    pages = -(-(address + nbytes - start) // page)
    vec = (ctypes.c_ubyte * pages)()
    try:
        mincore = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    if mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) != 0:
        return None
    return min(nbytes, bytes(vec).translate(_LOW_BIT).count(1) * page)


_LOW_BIT = bytes(b & 1 for b in range(256))  # mincore's vector: bit 0 of each byte is "resident"
