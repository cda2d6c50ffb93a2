"""RMSNorm (same operation order as Hugging Face's LlamaRMSNorm) and LayerNorm, in fp32.

With the C++ kernels a row is reduced in their fixed order; the torch path normalises row by row,
so that, as in the linears (app/layers/quant.py), a row's result never depends on its batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from app.layers.linear import Reader, meta_buffer
from app.layers.quant import rowwise

if TYPE_CHECKING:
    from app.kernels import CpuKernels


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, kernels: CpuKernels | None = None) -> None:
        super().__init__()
        self.eps, self.kernels = eps, kernels
        meta_buffer(self, "weight", (hidden,), torch.float32)

    def load(self, read: Reader) -> None:
        self.weight.copy_(read(None, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.norm(x, self.weight, None, self.eps)
        return rowwise(self._torch, x)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-2), F.layer_norm as nn.LayerNorm computes it."""

    def __init__(self, hidden: int, eps: float, kernels: CpuKernels | None = None) -> None:
        super().__init__()
        self.eps, self.kernels = eps, kernels
        meta_buffer(self, "weight", (hidden,), torch.float32)
        meta_buffer(self, "bias", (hidden,), torch.float32)

    def load(self, read: Reader, is_bias: bool = False) -> None:
        (self.bias if is_bias else self.weight).copy_(read(None, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.norm(x, self.weight, self.bias, self.eps)
        return rowwise(lambda r: F.layer_norm(r, self.weight.shape, self.weight, self.bias, self.eps), x)
