"""What a model costs before it is served: parameters, weight bytes per dtype and rank, KV bytes.

The one place these numbers come from (`shardserve inspect`, start-up logs and the weight_bytes
metric). Weight bytes are not estimated from bytes-per-parameter: each rank's model is built on
the meta device exactly as the loader builds it and laid out by the arena planner, so the
prediction equals the arena the rank allocates, padding and int8 scales included, by
construction. Only tensor headers are read from the file, never tensor data."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from app.layers.parallel import ShardingError, TPContext, head_split, split_range
from app.layers.quant import weight_format
from app.layers.rotary import RopeScalingError
from app.model.arena import ArenaLayout, plan_layout
from app.model.checkpoint import checkpoint_names, hf_name_from_gguf
from app.model.config import ModelConfig
from app.model.errors import ModelLoadError
from app.model.gguf_file import read_gguf
from app.model.loader import read_config
from app.model.memory import KV_BYTES, kv_bytes_per_token
from app.model.registry import model_class

PARTS = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")


@dataclass(frozen=True)
class TensorHeader:
    shape: tuple[int, ...]
    file_bytes: int  # as stored in the file (quantized GGUF blocks, safetensors dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class WeightShare:
    """One rank's arena for one dtype, split into slices of sharded tensors and whole copies."""

    total: int  # == plan_layout(model).nbytes == LoadedModel.weight_bytes
    sharded: int  # this rank's slices of tensors split across ranks (alignment padding included)
    replicated: int  # tensors every rank holds whole (norms, row-parallel biases)


@dataclass(frozen=True)
class RankCost:
    rank: int
    q_heads: tuple[int, int]  # [start, end) of the query heads this rank computes
    kv_heads: tuple[int, int]  # [start, end) of the KV heads it holds (copies when tp > kv heads)
    kv_replicated: bool  # its KV heads are also held by other ranks
    mlp_columns: tuple[int, int]  # [start, end) of the intermediate dimension
    vocab_rows: tuple[int, int]  # [start, end) of the embedding / LM head rows
    weights: dict[str, WeightShare]  # served dtype -> bytes
    kv_bytes_per_token: int
    kv_cache_bytes: int  # KV for max_num_seqs sequences at max_model_len, whole blocks

    def total_bytes(self, dtype: str) -> int:
        return self.weights[dtype].total + self.kv_cache_bytes


@dataclass(frozen=True)
class SplitCost:
    tp: int
    ranks: tuple[RankCost, ...]  # empty when the split is impossible
    error: str | None = None  # why this TP size cannot split the model

    @property
    def possible(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ModelCosts:
    path: Path
    config: ModelConfig
    file_format: str  # "gguf" | "safetensors"
    params: dict[str, int]  # part -> parameters (tied embeddings counted once, under embeddings)
    file_bytes: int  # tensor bytes as stored in the file
    weight_bytes: dict[str, int]  # dtype -> the whole model's arena (one rank)
    max_model_len: int
    max_num_seqs: int
    block_size: int
    kv_tokens: int  # per-sequence blocks rounded up, times max_num_seqs
    kv_bytes_per_token: int  # the whole model's K and V of one token (one rank)
    kv_dtype: str  # fp32 or fp16 (app/model/memory.kv_cache_dtype)
    splits: tuple[SplitCost, ...] = field(default=())

    @property
    def total_params(self) -> int:
        return sum(self.params.values())


class NoComm:
    """Stands in for the communicator of a model that is built (laid out, loaded), never run."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a model built for costing cannot run")

    all_gather_last_dim = all_reduce


def build_meta_model(
    config: ModelConfig, dtype: str, tp: int, rank: int, device_kind: str = "cpu"
) -> nn.Module:
    """Rank `rank`'s model as the loader builds it, weights on the meta device (no memory);
    raises ShardingError when `tp` cannot split the heads."""
    head_split(config.num_heads, config.num_kv_heads, tp)
    fmt = weight_format(dtype, device_kind)
    # The rotary cos/sin tables are built on a model's first forward, so this costs nothing for
    # them; learned position tables (GPT-2) are weights and are laid out like any other.
    try:
        return model_class(config.architecture)(config, TPContext(rank, tp), NoComm(rank, tp), fmt)
    except RopeScalingError as e:
        raise ModelLoadError(str(e)) from None


def rank_layout(config: ModelConfig, dtype: str, tp: int, rank: int, device_kind: str = "cpu") -> ArenaLayout:
    return plan_layout(build_meta_model(config, dtype, tp, rank, device_kind))


def weight_bytes_per_rank(config: ModelConfig, dtype: str, tp: int, device_kind: str = "cpu") -> list[int]:
    """Arena bytes of each rank for this dtype and TP size: what the server reports at start-up."""
    return [rank_layout(config, dtype, tp, r, device_kind).nbytes for r in range(tp)]


def _share(layout: ArenaLayout, whole: dict[str, tuple[int, ...]], tp: int) -> WeightShare:
    """Replicated = entries this rank holds at their full (tp = 1) shape, when tp > 1. Each entry
    is charged up to the next entry's offset, so padding is counted and the parts sum to total."""
    sharded = replicated = 0
    ends = [e[1] for e in layout.entries[1:]] + [layout.nbytes]
    for (name, offset, shape, _dtype), end in zip(layout.entries, ends, strict=True):
        if tp > 1 and whole.get(name) == shape:
            replicated += end - offset
        else:
            sharded += end - offset
    return WeightShare(layout.nbytes, sharded, replicated)


def read_tensor_headers(path: Path) -> dict[str, TensorHeader]:
    """Tensor name (Hugging Face convention where we know it) -> shape and stored bytes."""
    if path.is_file():
        gf = read_gguf(path)
        arch = gf.fields.get("general.architecture", "llama")
        return {
            hf_name_from_gguf(n, arch) or n: TensorHeader(t.shape, t.nbytes) for n, t in gf.tensors.items()
        }
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: malformed index ({e})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights found")
    out: dict[str, TensorHeader] = {}
    for fname in files:
        out.update(_safetensors_header(path / fname))
    return out


def _safetensors_header(fpath: Path) -> dict[str, TensorHeader]:
    """The format's 8-byte little-endian length and JSON header; nothing past it is read."""
    try:
        with open(fpath, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        return {
            name: TensorHeader(tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
            for name, v in header.items()
            if name != "__metadata__"
        }
    except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{fpath}: cannot read safetensors header ({e})") from None


def part_of(name: str) -> str:
    name = name.removeprefix("transformer.")  # GPT-2 files come with and without it
    if name in ("model.embed_tokens.weight", "wte.weight", "wpe.weight"):
        return "embeddings"
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return "other"  # old GPT-2 files' causal-mask buffers, not weights
    if name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in name or ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    module = (name.split(".")[-2:-1] or [""])[0]
    if "norm" in module or module in ("ln_1", "ln_2", "ln_f"):
        return "norms"
    return "other"  # tensors the model does not load (e.g. GGUF rope_freqs): counted, not served


def _rank_cost(
    config: ModelConfig, tp: int, rank: int, shares: dict[str, WeightShare], kv_tokens: int, kv_bytes: int
) -> RankCost:
    hs = head_split(config.num_heads, config.num_kv_heads, tp)[rank]
    per_token = kv_bytes_per_token(config, tp, rank, kv_bytes)
    return RankCost(
        rank=rank,
        q_heads=(hs.q_start, hs.q_start + hs.q_count),
        kv_heads=(hs.kv_start, hs.kv_start + hs.kv_count),
        kv_replicated=tp > config.num_kv_heads,
        mlp_columns=split_range(config.intermediate_size, tp, rank),
        vocab_rows=split_range(config.vocab_size, tp, rank),
        weights=shares,
        kv_bytes_per_token=per_token,
        kv_cache_bytes=per_token * kv_tokens,
    )


def model_costs(
    path: Path,
    dtypes: list[str],
    tp_sizes: list[int],
    *,
    max_model_len: int | None = None,
    max_num_seqs: int = 1,
    block_size: int = 16,
    device_kind: str = "cpu",
    kv_dtype: str = "fp32",
) -> ModelCosts:
    """Every number `inspect` shows, from the file's metadata and tensor headers alone."""
    path = Path(path)
    config = read_config(path)
    headers = read_tensor_headers(path)
    limit, why = config.context_limit()
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"--max-model-len {max_model_len} exceeds {why}")
    ctx = max_model_len or limit
    kv_tokens = max_num_seqs * -(-ctx // block_size) * block_size  # the server allocates whole blocks

    params = dict.fromkeys(PARTS, 0)
    for name, h in headers.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied head is the embedding table: one tensor, counted once
        params[part_of(name)] += h.numel

    whole: dict[str, dict[str, tuple[int, ...]]] = {}  # dtype -> buffer shapes of the unsplit model
    weight_bytes: dict[str, int] = {}
    for dtype in dtypes:
        model = build_meta_model(config, dtype, 1, 0, device_kind)
        missing = sorted(set(model.weight_loaders()) - set(checkpoint_names(model, list(headers))))
        if missing:  # the loader would refuse it: say so now rather than cost a model that cannot load
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ModelLoadError(f"{path}: missing weights {', '.join(missing[:3])}{more}")
        layout = plan_layout(model)
        whole[dtype] = {name: shape for name, _off, shape, _dt in layout.entries}
        weight_bytes[dtype] = layout.nbytes

    splits = []
    for tp in tp_sizes:
        try:
            head_split(config.num_heads, config.num_kv_heads, tp)
        except ShardingError as e:
            splits.append(SplitCost(tp, (), str(e)))
            continue
        ranks = []
        for r in range(tp):
            shares = {d: _share(rank_layout(config, d, tp, r, device_kind), whole[d], tp) for d in dtypes}
            ranks.append(_rank_cost(config, tp, r, shares, kv_tokens, KV_BYTES[kv_dtype]))
        splits.append(SplitCost(tp, tuple(ranks)))

    return ModelCosts(
        path=path,
        config=config,
        file_format="gguf" if path.is_file() else "safetensors",
        params=params,
        file_bytes=sum(h.file_bytes for h in headers.values()),
        weight_bytes=weight_bytes,
        max_model_len=ctx,
        max_num_seqs=max_num_seqs,
        block_size=block_size,
        kv_tokens=kv_tokens,
        kv_bytes_per_token=kv_bytes_per_token(config, 1, 0, KV_BYTES[kv_dtype]),
        kv_dtype=kv_dtype,
        splits=tuple(splits),
    )
