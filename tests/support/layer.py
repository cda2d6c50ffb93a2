"""One random decoder layer as the kernels' fused calls take it, for tests of attn_block, mlp_block
and layer_block: small odd shapes (3 q heads per KV head, rows at different places in paged
blocks), weights of one dtype, a KV cache already holding each row's earlier positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.kernels import CpuKernels
from app.layers.quant import weight_format

H, HQ, HKV, D, INTER, BLOCK = 80, 6, 2, 16, 56, 16
POSITIONS = [5, 0, 20, 16]  # one decode row per sequence: mid-block, first, second block, a block start


@dataclass
class Layer:
    """Fresh inputs per call (the fused calls add the residual into x and write the KV cache)."""

    x: torch.Tensor
    residual: torch.Tensor | None
    caches: tuple[torch.Tensor, torch.Tensor]
    attn_consts: tuple  # everything of attn_block after x, residual, residual bias, except caches
    o_bias: torch.Tensor | None
    mlp_consts: tuple  # mlp_block's norm, gate_up and down operands

    def attn_args(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple:
        (norm_w, eps, qkv_w, qkv_s, qkv_b, hq, hkv, d, pos, cos, sin, slots, tables, row_seq, row_len,
         bs, scale, o_w, o_s) = self.attn_consts  # fmt: skip
        return (
            x, None if self.residual is None else self.residual.clone(), None, norm_w, eps, qkv_w, qkv_s,
            qkv_b, hq, hkv, d, pos, cos, sin, slots, k_cache, v_cache, tables, row_seq, row_len, bs, scale,
            o_w, o_s,
        )  # fmt: skip

    def fresh(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x.clone(), self.caches[0].clone(), self.caches[1].clone()


def _linear(kernels: CpuKernels, dtype: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A weight in the layout the model's loader gives the kernels for `dtype`."""
    fmt = weight_format(dtype, kernels=kernels)
    bufs = {n: torch.empty(s, dtype=t) for n, (s, t) in fmt.specs(*w.shape).items()}
    fmt.store(bufs, 0, w)
    operands = fmt.kernel_operands(bufs)
    return operands[0], operands[1]


def random_layer(kernels: CpuKernels, seed: int, dtype: str = "fp32", rows: int = len(POSITIONS)) -> Layer:
    g = torch.Generator().manual_seed(seed)
    positions = POSITIONS[:rows]
    blocks_per_seq = 2
    n_blocks = max(1, rows * blocks_per_seq)
    # sequence s owns blocks in reverse order: paging must not matter
    tables = torch.tensor(
        [[n_blocks - 1 - (s * blocks_per_seq + j) for j in range(blocks_per_seq)] for s in range(rows)],
        dtype=torch.int32,
    ).view(rows, blocks_per_seq)
    slots = torch.tensor(
        [int(tables[s, p // BLOCK]) * BLOCK + p % BLOCK for s, p in enumerate(positions)], dtype=torch.long
    )
    k_cache = torch.randn(n_blocks, HKV, D, BLOCK, generator=g)
    v_cache = torch.randn(n_blocks, HKV, BLOCK, D, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.outer(torch.arange(64).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    W = (HQ + 2 * HKV) * D
    qkv_w, qkv_s = _linear(kernels, dtype, torch.randn(W, H, generator=g) * 0.1)
    o_w, o_s = _linear(kernels, dtype, torch.randn(H, HQ * D, generator=g) * 0.1)
    gu_w, gu_s = _linear(kernels, dtype, torch.randn(2 * INTER, H, generator=g) * 0.1)
    down_w, down_s = _linear(kernels, dtype, torch.randn(H, INTER, generator=g) * 0.1)
    attn_consts = (
        torch.rand(H, generator=g) + 0.5, 1e-5, qkv_w, qkv_s, torch.randn(W, generator=g) * 0.1, HQ, HKV, D,
        torch.tensor(positions, dtype=torch.long), cos.contiguous(), sin.contiguous(), slots, tables,
        torch.arange(rows, dtype=torch.int32), torch.tensor([p + 1 for p in positions], dtype=torch.int32),
        BLOCK, D**-0.5, o_w, o_s,
    )  # fmt: skip
    mlp_consts = (torch.rand(H, generator=g) + 0.5, 1e-5, gu_w, gu_s, None, down_w, down_s)
    return Layer(
        x=torch.randn(rows, H, generator=g),
        residual=torch.randn(rows, H, generator=g),
        caches=(k_cache, v_cache),
        attn_consts=attn_consts,
        o_bias=torch.randn(H, generator=g) * 0.1,
        mlp_consts=mlp_consts,
    )
