"""Column- and row-parallel linears (Megatron style). Sharding happens while loading, never in
forward: each rank's module holds only its rows (column-parallel) or columns (row-parallel)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from app.layers.parallel import Comm
from app.layers.quant import Bufs, WeightFormat

# Reads a checkpoint tensor's slice as fp32: read(rows, cols) -> Tensor[len(rows), len(cols)].
Reader = Callable[[slice | None, slice | None], torch.Tensor]

# Rows converted per chunk while loading: bounds the fp32 temporary of a large tensor.
LOAD_CHUNK_ROWS = 4096


def meta_buffer(module: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Declare a weight; the rank's arena later replaces it with a view (app/model/arena.py)."""
    module.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))


class QuantLinear(nn.Module):
    """y = x @ W.T (+ b) with W stored in a WeightFormat; no collective of its own."""

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self._names = []
        for name, (shape, dtype) in fmt.specs(out_features, in_features).items():
            meta_buffer(self, name, shape, dtype)
            self._names.append(name)
        self.has_bias = bias
        if bias:
            meta_buffer(self, "bias", (out_features,), torch.float32)

    def bufs(self) -> Bufs:
        return {n: getattr(self, n) for n in self._names}

    def load_rows(
        self, dst_row0: int, read: Reader, rows: tuple[int, int], cols: slice | None = None
    ) -> None:
        """Copy source rows [rows[0], rows[1]) (optionally only `cols`) to rows from dst_row0."""
        bufs = self.bufs()
        for r0 in range(rows[0], rows[1], LOAD_CHUNK_ROWS):
            r1 = min(rows[1], r0 + LOAD_CHUNK_ROWS)
            self.fmt.store(bufs, dst_row0 + r0 - rows[0], read(slice(r0, r1), cols))

    def load_bias(self, dst0: int, read: Reader, rows: tuple[int, int]) -> None:
        self.bias[dst0 : dst0 + rows[1] - rows[0]].copy_(read(slice(*rows), None))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmt.matmul(self.bufs(), x)

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weight, scale or None, bias or None) for the C++ kernels' fused blocks."""
        weight, scale = self.fmt.kernel_operands(self.bufs())
        return weight, scale, self.bias if self.has_bias else None


@dataclass(frozen=True)
class Shard:
    """A part of a fused column-parallel weight: source rows [start, end) of checkpoint `name`."""

    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class ColumnParallelLinear(QuantLinear):
    """Holds this rank's output rows of one or more checkpoint weights, fused (q|k|v, gate|up)."""

    def __init__(self, in_features: int, shards: list[Shard], fmt: WeightFormat, bias: bool = False) -> None:
        super().__init__(in_features, sum(s.size for s in shards), fmt, bias)
        self.shards = {s.name: s for s in shards}
        offsets, acc = {}, 0
        for s in shards:
            offsets[s.name], acc = acc, acc + s.size
        self.offsets = offsets

    def load(self, shard: str, read: Reader, is_bias: bool = False) -> None:
        s = self.shards[shard]
        if is_bias:
            self.load_bias(self.offsets[shard], read, (s.start, s.end))
        else:
            self.load_rows(self.offsets[shard], read, (s.start, s.end))

    def split_sizes(self) -> list[int]:
        return [s.size for s in self.shards.values()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y + self.bias if self.has_bias else y


class RowParallelLinear(QuantLinear):
    """Holds input columns [cols) of the weight; its output is a partial sum, reduced once here."""

    def __init__(
        self, cols: tuple[int, int], out_features: int, fmt: WeightFormat, comm: Comm, bias: bool = False
    ) -> None:
        super().__init__(cols[1] - cols[0], out_features, fmt, bias)
        self.cols, self.comm = cols, comm

    def load(self, read: Reader, is_bias: bool = False) -> None:
        if is_bias:
            self.load_bias(0, read, (0, self.out_features))
        else:
            self.load_rows(0, read, (0, self.out_features), slice(*self.cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # this rank's partial sum
        y = self.comm.all_reduce(y)  # the layer's one collective
        return y + self.bias if self.has_bias else y  # the bias once, after the reduction
