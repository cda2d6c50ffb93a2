"""RMSNorm in fp32, with the same operation order as Hugging Face's LlamaRMSNorm."""

from __future__ import annotations

import torch
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
