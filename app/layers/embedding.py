"""Vocab-parallel embedding and LM head: each rank holds vocabulary rows [v0, v1).

Vocab-parallel rather than replicated: the LM head is the largest single matmul of a small model
(49152 x 576 of SmolLM2's 134 M linear parameters), so splitting it divides the step's biggest
read; the price is one all-reduce of the hidden states (embedding) and one all-gather of the
logits (head), both small next to it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from app.layers.linear import QuantLinear, Reader, meta_buffer
from app.layers.parallel import Comm, TPContext
from app.layers.quant import WeightFormat


class VocabParallelEmbedding(QuantLinear):
    def __init__(self, vocab_size: int, hidden: int, fmt: WeightFormat, tp: TPContext, comm: Comm) -> None:
        self.v0, self.v1 = tp.split(vocab_size)
        super().__init__(hidden, self.v1 - self.v0, fmt)
        self.vocab_size, self.comm = vocab_size, comm

    def load(self, read: Reader) -> None:
        self.load_rows(0, read, (self.v0, self.v1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.world_size == 1:
            return self.fmt.rows(self.bufs(), ids)
        mine = (ids >= self.v0) & (ids < self.v1)
        local = torch.where(mine, ids - self.v0, torch.zeros_like(ids))
        x = self.fmt.rows(self.bufs(), local) * mine[:, None]
        return self.comm.all_reduce(x)


class ParallelLMHead(nn.Module):
    """Logits over the whole vocabulary: this rank's rows, then an all-gather along the vocab."""

    def __init__(self, table: QuantLinear, comm: Comm) -> None:
        super().__init__()
        self.table, self.comm = table, comm  # the embedding itself when tied

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather_last_dim(self.table.linear(h))


class PositionEmbedding(nn.Module):
    """Learned absolute positions (GPT-2's wpe), replicated on every rank and kept in fp32: a small
    table (0.6% of GPT-2 small) whose rows add straight into the residual stream."""

    def __init__(self, max_positions: int, hidden: int) -> None:
        super().__init__()
        meta_buffer(self, "weight", (max_positions, hidden), torch.float32)

    def load(self, read: Reader) -> None:
        self.weight.copy_(read(None, None))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)


def lm_head_for(
    embedding: VocabParallelEmbedding, tied: bool, fmt: WeightFormat, tp: TPContext, comm: Comm
) -> tuple[ParallelLMHead, VocabParallelEmbedding | None]:
    """The LM head over the embedding's own rows when tied, else over a table of its own (returned
    so the model can load `lm_head.weight` into it)."""
    if tied:
        return ParallelLMHead(embedding, comm), None
    table = VocabParallelEmbedding(embedding.vocab_size, embedding.in_features, fmt, tp, comm)
    return ParallelLMHead(table, comm), table
