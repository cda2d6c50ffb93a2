"""How a tensor-parallel rank's share of heads, columns and vocabulary is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Comm(Protocol):
    """The collectives the model's forward uses (app/worker/comm.py implements them)."""

    rank: int
    world_size: int

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor: ...

    def native_all_reduce(self) -> object | None:
        """The C++ kernels' handle on this all-reduce (they reduce inside their call), or None."""
        ...


def split_sizes(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` contiguous pieces, the first ones one larger when uneven."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    sizes = split_sizes(total, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass(frozen=True)
class HeadSplit:
    """One rank's attention heads: query heads [q_start, q_start+q_count), same for KV heads."""

    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


class ShardingError(ValueError):
    pass


def head_split(num_heads: int, num_kv_heads: int, tp: int) -> list[HeadSplit]:
    """Split heads in whole KV groups, unevenly where needed (9 q / 3 kv at tp=2: 6+3 q, 2+1 kv).

    With more ranks than KV heads, each KV head is replicated on the ranks that share its group
    and the group's query heads are split between them. Refused only when a rank would get no
    query head at all (tp > num_heads).
    """
    if tp < 1:
        raise ShardingError(f"tensor-parallel size must be >= 1, got {tp}")
    if tp > num_heads:
        raise ShardingError(
            f"tensor-parallel size {tp} exceeds the model's {num_heads} attention heads; "
            f"use a size from 1 to {num_heads}"
        )
    group = num_heads // num_kv_heads
    if tp <= num_kv_heads:
        splits, kv_start = [], 0
        for kv_count in split_sizes(num_kv_heads, tp):
            splits.append(HeadSplit(kv_start * group, kv_count * group, kv_start, kv_count))
            kv_start += kv_count
        return splits
    owners = [r * num_kv_heads // tp for r in range(tp)]  # the KV head each rank replicates
    splits = []
    for r, kv in enumerate(owners):
        sharing = [i for i, o in enumerate(owners) if o == kv]
        q0, q1 = split_range(group, len(sharing), sharing.index(r))
        splits.append(HeadSplit(kv * group + q0, q1 - q0, kv, 1))
    return splits


@dataclass(frozen=True)
class TPContext:
    """This rank's place in the tensor-parallel group, handed to every sharded layer."""

    rank: int
    world_size: int

    def split(self, total: int) -> tuple[int, int]:
        return split_range(total, self.world_size, self.rank)
