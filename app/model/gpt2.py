"""GPT-2, built from the same layers as the Llama family.

What differs: learned absolute positions instead of RoPE, LayerNorm with biases, a GELU MLP
without a gate, biases on every projection, and a tied LM head. Checkpoints store the
projections as Conv1D weights, [in, out] (the transpose of a Linear's), with q|k|v fused in one
`c_attn`; the loaders transpose and split them while reading each rank's slice, so the forward
sees ordinary column/row-parallel linears."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from app.layers.activation import activation
from app.layers.attention import AttentionMetadata, paged_attention
from app.layers.embedding import PositionEmbedding, VocabParallelEmbedding, lm_head_for
from app.layers.linear import ColumnParallelLinear, Reader, RowParallelLinear, Shard
from app.layers.norm import LayerNorm
from app.layers.parallel import Comm, TPContext, head_split
from app.layers.quant import WeightFormat
from app.model.config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]


def transposed(read: Reader) -> Reader:
    """A Conv1D weight [in, out] read as the Linear weight [out, in] the layers expect."""
    return lambda rows, cols: read(cols, rows).t().contiguous()


def row_offset(read: Reader, offset: int) -> Reader:
    """Rows [a, b) of one part of a fused tensor are rows [offset + a, offset + b) of the whole."""

    def shifted(rows: slice | None, cols: slice | None) -> torch.Tensor:
        assert rows is not None and rows.step is None  # the layers always ask for explicit rows
        return read(slice(offset + rows.start, offset + rows.stop), cols)

    return shifted


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, comm: Comm, fmt: WeightFormat):
        super().__init__()
        hs = head_split(cfg.num_heads, cfg.num_kv_heads, tp.world_size)[tp.rank]
        d = cfg.head_dim
        self.num_heads, self.head_dim, self.hidden = hs.q_count, d, cfg.hidden_size
        self.scale = d**-0.5
        h0, h1 = hs.q_start * d, (hs.q_start + hs.q_count) * d
        self.c_attn = ColumnParallelLinear(
            cfg.hidden_size, [Shard("q", h0, h1), Shard("k", h0, h1), Shard("v", h0, h1)], fmt, bias=True
        )
        self.c_proj = RowParallelLinear((h0, h1), cfg.hidden_size, fmt, comm, bias=True)

    def load_qkv(self, read: Reader, is_bias: bool) -> None:
        """c_attn holds q, k and v one after the other along its outputs: each is a shard here."""
        for i, part in enumerate(("q", "k", "v")):
            self.c_attn.load(part, row_offset(read, i * self.hidden), is_bias)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.c_attn.split_sizes(), dim=-1)
        t = x.shape[0]
        shape = (t, self.num_heads, self.head_dim)
        o = paged_attention(q.view(shape), k.view(shape), v.view(shape), kv_cache, meta, self.scale)
        return self.c_proj(o.reshape(t, -1))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, comm: Comm, fmt: WeightFormat):
        super().__init__()
        i0, i1 = tp.split(cfg.intermediate_size)
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, [Shard("fc", i0, i1)], fmt, bias=True)
        self.c_proj = RowParallelLinear((i0, i1), cfg.hidden_size, fmt, comm, bias=True)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, comm: Comm, fmt: WeightFormat):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, fmt.kernels)
        self.attn = GPT2Attention(cfg, tp, comm, fmt)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, fmt.kernels)
        self.mlp = GPT2MLP(cfg, tp, comm, fmt)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, comm: Comm, fmt: WeightFormat):
        super().__init__()
        self.config = cfg
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, fmt, tp, comm)
        self.wpe = PositionEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, tp, comm, fmt) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, fmt.kernels)
        self.lm_head, self.lm_head_table = lm_head_for(self.wte, cfg.tie_word_embeddings, fmt, tp, comm)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] for a flat ragged batch."""
        x = self.wte(input_ids) + self.wpe(positions)
        for block, cache in zip(self.h, kv_caches, strict=False):
            x = block(x, cache, meta)
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def kv_shape(self) -> tuple[int, int]:
        """(kv heads on this rank, head dim): one cache slot's shape per layer."""
        attn = self.h[0].attn
        return attn.num_heads, attn.head_dim

    @staticmethod
    def canonical_name(name: str) -> str:
        """Files saved from GPT2Model (the hub's gpt2) lack GPT2LMHeadModel's `transformer.` prefix."""
        return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name

    def weight_loaders(self) -> dict[str, Callable[[Reader], None]]:
        """Checkpoint tensor name (GPT2LMHeadModel's naming) -> the loader of this rank's slice."""
        loaders: dict[str, Callable[[Reader], None]] = {
            "transformer.wte.weight": self.wte.load,
            "transformer.wpe.weight": self.wpe.load,
            "transformer.ln_f.weight": self.ln_f.load,
            "transformer.ln_f.bias": lambda read: self.ln_f.load(read, True),
        }
        if self.lm_head_table is not None:
            loaders["lm_head.weight"] = self.lm_head_table.load
        for i, block in enumerate(self.h):
            p = f"transformer.h.{i}."
            attn, mlp = block.attn, block.mlp
            for name, norm in (("ln_1", block.ln_1), ("ln_2", block.ln_2)):
                loaders[f"{p}{name}.weight"] = norm.load
                loaders[f"{p}{name}.bias"] = lambda read, norm=norm: norm.load(read, True)
            loaders[p + "attn.c_attn.weight"] = lambda read, a=attn: a.load_qkv(transposed(read), False)
            loaders[p + "attn.c_attn.bias"] = lambda read, a=attn: a.load_qkv(read, True)
            loaders[p + "mlp.c_fc.weight"] = lambda read, m=mlp: m.c_fc.load("fc", transposed(read))
            loaders[p + "mlp.c_fc.bias"] = lambda read, m=mlp: m.c_fc.load("fc", read, True)
            for name, layer in (("attn.c_proj", attn.c_proj), ("mlp.c_proj", mlp.c_proj)):
                loaders[f"{p}{name}.weight"] = lambda read, ly=layer: ly.load(transposed(read))
                loaders[f"{p}{name}.bias"] = lambda read, ly=layer: ly.load(read, True)
        return loaders
