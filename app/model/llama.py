"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2), built from app/layers.

Mistral is this body with its own config fields (a sliding window caps the served context: see
ModelConfig.context_limit); Qwen2 adds biases to q, k and v but not to o.

The model is plain: tensor parallelism and quantization enter only through the layers it is
built from (sharded linears, weight formats) and the communicator passed in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from app.layers.activation import activation
from app.layers.attention import AttentionMetadata, KernelAttention, paged_attention
from app.layers.embedding import VocabParallelEmbedding, lm_head_for
from app.layers.linear import ColumnParallelLinear, Reader, RowParallelLinear, Shard
from app.layers.norm import RMSNorm
from app.layers.parallel import Comm, TPContext, head_split
from app.layers.quant import WeightFormat
from app.layers.rotary import RotaryEmbedding
from app.model.config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]
_NO_COMM = object()  # one rank: the fused layer reduces nothing


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, comm: Comm, fmt: WeightFormat, rope: RotaryEmbedding):
        super().__init__()
        hs = head_split(cfg.num_heads, cfg.num_kv_heads, tp.world_size)[tp.rank]
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = hs.q_count, hs.kv_count, d
        self.scale = d**-0.5
        self.rope = rope
        q0, kv0 = hs.q_start * d, hs.kv_start * d
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            [
                Shard("q", q0, q0 + hs.q_count * d),
                Shard("k", kv0, kv0 + hs.kv_count * d),
                Shard("v", kv0, kv0 + hs.kv_count * d),
            ],
            fmt,
            bias=cfg.attention_bias or cfg.qkv_bias,
        )
        self.o_proj = RowParallelLinear(
            (q0, q0 + hs.q_count * d), cfg.hidden_size, fmt, comm, cfg.attention_bias
        )

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.split_sizes(), dim=-1)
        t = x.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rope(positions, q, k)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, comm: Comm, fmt: WeightFormat):
        super().__init__()
        i0, i1 = tp.split(cfg.intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [Shard("gate", i0, i1), Shard("up", i0, i1)], fmt, bias=cfg.mlp_bias
        )
        self.down_proj = RowParallelLinear((i0, i1), cfg.hidden_size, fmt, comm, cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, comm: Comm, fmt: WeightFormat, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fmt.kernels)
        self.self_attn = LlamaAttention(cfg, tp, comm, fmt, rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fmt.kernels)
        self.mlp = LlamaMLP(cfg, tp, comm, fmt)

    def forward(self, positions, x, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass(frozen=True)
class FusedLayer:
    """One decoder layer's tensors and constants as the C++ fused blocks take them (views into the
    arena, so built after loading; see LlamaForCausalLM._forward_fused)."""

    attn_norm: tuple[torch.Tensor, float]
    qkv: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # weight, scale, bias
    heads: tuple[int, int, int]  # q heads, KV heads, head dim on this rank
    scale: float
    o: tuple[torch.Tensor, torch.Tensor | None]
    o_comm: Comm
    o_bias: torch.Tensor | None  # added after the all-reduce, with the residual
    mlp_norm: tuple[torch.Tensor, float]
    gate_up: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    down_comm: Comm
    down_bias: torch.Tensor | None

    @classmethod
    def of(cls, layer: LlamaDecoderLayer) -> FusedLayer:
        attn, mlp = layer.self_attn, layer.mlp
        o, down = attn.o_proj.kernel_operands(), mlp.down_proj.kernel_operands()
        return cls(
            attn_norm=(layer.input_layernorm.weight, layer.input_layernorm.eps),
            qkv=attn.qkv_proj.kernel_operands(),
            heads=(attn.num_heads, attn.num_kv_heads, attn.head_dim),
            scale=attn.scale,
            o=o[:2], o_comm=attn.o_proj.comm, o_bias=o[2],
            mlp_norm=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps),
            gate_up=mlp.gate_up_proj.kernel_operands(),
            down=down[:2], down_comm=mlp.down_proj.comm, down_bias=down[2],
        )  # fmt: skip


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, comm: Comm, fmt: WeightFormat):
        super().__init__()
        self.config = cfg
        self._fused: list[FusedLayer] | None = None
        self._native_comm: object | None = None  # see _forward_fused; set with _fused
        rope = RotaryEmbedding(cfg.head_dim, cfg.position_limit, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, fmt, tp, comm)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, tp, comm, fmt, rope) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fmt.kernels)
        self.lm_head, self.lm_head_table = lm_head_for(
            self.embed_tokens, cfg.tie_word_embeddings, fmt, tp, comm
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] for a flat ragged batch."""
        if meta.kernel is not None and self.config.hidden_act == "silu":
            return self._forward_fused(input_ids, positions, kv_caches, meta.kernel)
        x = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, kv_caches, strict=False):
            x = layer(positions, x, cache, meta)
        return self.norm(x)

    def _forward_fused(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], k: KernelAttention
    ) -> torch.Tensor:
        """The same forward through the C++ kernels, one call and one parallel region per layer
        (norm -> qkv -> rotary + KV write -> attention -> o_proj -> all-reduce -> norm -> gate_up ->
        silu * up -> down -> all-reduce); the residual add joins the next norm.

        The row-parallel all-reduces run inside that call, through the communicator's native
        handle (the shared-memory one at TP > 1, none at TP = 1): a deliberate exception to the
        visible collective of the torch path, named in one place, Kernels::layer_block. Where the
        communicator has no native handle (gloo, NCCL) or a step outgrows its shared slot, the
        layer is two calls with the all-reduces here, between them."""
        kernels = k.kernels
        cos, sin = self.layers[0].self_attn.rope.tables()
        x = self.embed_tokens(input_ids).contiguous()
        residual: torch.Tensor | None = None
        residual_bias: torch.Tensor | None = None
        fused, comm = self._fused_layers(), self._native_comm
        one_call = comm is not None and (comm is _NO_COMM or x.numel() <= comm.capacity)
        for f, (k_cache, v_cache) in zip(fused, kv_caches, strict=True):
            attn = (
                x, residual, residual_bias, *f.attn_norm, *f.qkv, *f.heads, positions, cos, sin, k.slots,
                k_cache, v_cache, k.tables, k.row_seq, k.row_len, k.block_size, f.scale, *f.o,
            )  # fmt: skip
            if one_call:
                residual = kernels.layer_block(
                    *attn, f.o_bias, *f.mlp_norm, *f.gate_up, *f.down, None if comm is _NO_COMM else comm
                )
            else:
                residual = f.o_comm.all_reduce(kernels.attn_block(*attn))  # o_proj's one collective
                y = kernels.mlp_block(x, residual, f.o_bias, *f.mlp_norm, *f.gate_up, *f.down)
                residual = f.down_comm.all_reduce(y)  # down_proj's one collective
            residual_bias = f.down_bias
        return kernels.add_norm(x, residual, residual_bias, self.norm.weight, None, self.norm.eps)

    def _fused_layers(self) -> list[FusedLayer]:
        """Each layer's operands for the fused blocks, gathered once: looking them up through the
        modules' attributes cost ~1 ms of a 10 ms batch-1 step."""
        if self._fused is None:
            self._fused = [FusedLayer.of(layer) for layer in self.layers]
            comm = self._fused[0].o_comm if self._fused else None
            # layer_block reduces both halves through one handle: the model has one communicator
            assert all(f.o_comm is comm and f.down_comm is comm for f in self._fused)
            if comm is None or comm.world_size == 1:
                self._native_comm = _NO_COMM
            else:
                self._native_comm = comm.native_all_reduce()
        return self._fused

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def kv_shape(self) -> tuple[int, int]:
        """(kv heads on this rank, head dim): one cache slot's shape per layer."""
        attn = self.layers[0].self_attn
        return attn.num_kv_heads, attn.head_dim

    def weight_loaders(self) -> dict[str, Callable[[Reader], None]]:
        """Checkpoint tensor name (Hugging Face naming) -> the loader that takes this rank's slice."""
        loaders: dict[str, Callable[[Reader], None]] = {
            "model.embed_tokens.weight": self.embed_tokens.load,
            "model.norm.weight": self.norm.load,
        }
        if self.lm_head_table is not None:
            loaders["lm_head.weight"] = self.lm_head_table.load
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            loaders[p + "input_layernorm.weight"] = layer.input_layernorm.load
            loaders[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.load
            for kind in ("weight", "bias") if attn.qkv_proj.has_bias else ("weight",):
                for s in ("q", "k", "v"):
                    loaders[f"{p}self_attn.{s}_proj.{kind}"] = _shard_loader(attn.qkv_proj, s, kind == "bias")
            for kind in ("weight", "bias") if attn.o_proj.has_bias else ("weight",):
                loaders[f"{p}self_attn.o_proj.{kind}"] = _row_loader(attn.o_proj, kind == "bias")
            for kind in ("weight", "bias") if self.config.mlp_bias else ("weight",):
                is_bias = kind == "bias"
                for s in ("gate", "up"):
                    loaders[f"{p}mlp.{s}_proj.{kind}"] = _shard_loader(mlp.gate_up_proj, s, is_bias)
                loaders[f"{p}mlp.down_proj.{kind}"] = _row_loader(mlp.down_proj, is_bias)
        return loaders


def _shard_loader(layer: ColumnParallelLinear, shard: str, is_bias: bool) -> Callable[[Reader], None]:
    return lambda read: layer.load(shard, read, is_bias)


def _row_loader(layer: RowParallelLinear, is_bias: bool) -> Callable[[Reader], None]:
    return lambda read: layer.load(read, is_bias)
