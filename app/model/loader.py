"""Build a rank's model on the meta device, lay it out in one arena, stream its slices into it."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from app.device import Device
from app.kernels import CpuKernels
from app.layers.parallel import Comm, ShardingError, TPContext, head_split
from app.layers.quant import weight_format
from app.layers.rotary import RopeScalingError
from app.model.arena import pack_into_arena
from app.model.checkpoint import (
    Checkpoint,
    GGUFCheckpoint,
    SafetensorsCheckpoint,
    checkpoint_names,
    gguf_permutes_qk,
    gguf_rope_freqs,
)
from app.model.config import ModelConfig, config_from_gguf, config_from_hf
from app.model.errors import ModelLoadError, reading_model
from app.model.gguf_file import GGUFFile, read_gguf
from app.model.registry import model_class

_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    arena: torch.Tensor  # uint8, every weight of this rank is a view into it
    load_seconds: float
    device: Device  # where the arena is, and where the KV cache goes
    kernels: CpuKernels | None = None  # the C++ kernels the model computes with; None: torch path

    @property
    def weight_bytes(self) -> int:
        return self.arena.numel()


def read_config(path: Path) -> ModelConfig:
    """The model's config from metadata alone (no weight data is read; Llama 3's rope_freqs,
    a few hundred bytes, is configuration stored as a tensor)."""
    with reading_model(path):
        if path.is_file():
            gf = read_gguf(path)
            config = config_from_gguf(gf.fields, set(gf.tensors), path, rope_freqs=gguf_rope_freqs(gf))
            _check_gguf_shape(config, gf, path)
            return config
        if path.is_dir():
            return config_from_hf(path)
    raise ModelLoadError(f"{path}: no such file or directory")


def _check_gguf_shape(config: ModelConfig, gf: GGUFFile, path: Path) -> None:
    """The metadata's layer count and widths against the tensors the file holds, as llama.cpp
    checks them: corrupt numbers would otherwise build a model of 2**40 layers (a hang) or ask
    for an arena of petabytes."""
    blocks = {int(m.group(1)) for name in gf.tensors if (m := _BLOCK.match(name))}
    if len(blocks) != config.num_layers or max(blocks, default=-1) != config.num_layers - 1:  # blocks 0..n-1
        raise ModelLoadError(
            f"{path}: the metadata says {config.num_layers} layers, the file holds tensors of {len(blocks)}"
        )
    embed = gf.tensors.get("token_embd.weight")
    if embed is not None and embed.shape != (config.vocab_size, config.hidden_size):
        raise ModelLoadError(
            f"{path}: token_embd.weight is {list(embed.shape)}, the metadata says "
            f"[{config.vocab_size}, {config.hidden_size}] (vocabulary, embedding width)"
        )


def open_checkpoint(path: Path, config: ModelConfig) -> Checkpoint:
    if path.is_file():
        gf = read_gguf(path)
        heads = {"q": config.num_heads, "k": config.num_kv_heads} if gguf_permutes_qk(gf) else {}
        return GGUFCheckpoint(gf, heads)
    return SafetensorsCheckpoint(path)


def load_model(
    path: Path,
    dtype: str,
    tp: TPContext,
    comm: Comm,
    *,
    device: Device | None = None,
    kernels: CpuKernels | None = None,
    progress: bool = False,
) -> LoadedModel:
    """`progress`: a bar over the tensors loaded (on stderr)."""
    t0 = time.perf_counter()
    config = read_config(path)
    try:
        head_split(config.num_heads, config.num_kv_heads, tp.world_size)
    except ShardingError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    device = device or Device.resolve("cpu")
    fmt = weight_format(dtype, device.kind, kernels=kernels)
    try:
        model = model_class(config.architecture)(config, tp, comm, fmt)
    except RopeScalingError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    arena = pack_into_arena(model, device.alloc)
    with reading_model(path):
        ckpt = open_checkpoint(path, config)
        loaders = model.weight_loaders()
        available = checkpoint_names(model, ckpt.names())
        missing = sorted(set(loaders) - set(available))
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ModelLoadError(f"{path}: missing weights {', '.join(missing[:3])}{more}")
        uploader = device.uploader()
        with torch.no_grad():
            names = tqdm(
                sorted(loaders), desc="loading weights", unit="tensor", disable=not progress, leave=False
            )
            for name in names:  # file order does not matter: each loader writes its own view
                read = ckpt.reader(available[name])
                loaders[name](lambda rows, cols, read=read: uploader.upload(read(rows, cols)))
            device.synchronize()
        ckpt.close()
    return LoadedModel(model.eval(), config, arena, time.perf_counter() - t0, device, kernels)
