"""RMSNorm (same operation order as Hugging Face's LlamaRMSNorm) and LayerNorm, in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from app.layers.linear import Reader, meta_buffer


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        meta_buffer(self, "weight", (hidden,), torch.float32)

    def load(self, read: Reader) -> None:
        self.weight.copy_(read(None, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-2), F.layer_norm as nn.LayerNorm computes it."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        meta_buffer(self, "weight", (hidden,), torch.float32)
        meta_buffer(self, "bias", (hidden,), torch.float32)

    def load(self, read: Reader, is_bias: bool = False) -> None:
        (self.bias if is_bias else self.weight).copy_(read(None, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
