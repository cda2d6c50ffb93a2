"""Checkpoint readers: names in Hugging Face's convention, slices read as fp32 on demand.

A rank asks only for its rows or columns; safetensors reads just those bytes (get_slice) and
GGUF dequantizes just those rows of the memory-mapped file, so no process materialises the whole
model, and the fp32 temporary is at most one slice of one tensor."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.layers.linear import Reader
from app.model.errors import ModelLoadError
from app.model.gguf_file import GGUFFile


class Checkpoint(ABC):
    path: Path

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def reader(self, name: str) -> Reader: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def _index(sl: slice | None) -> slice:
    return slice(None) if sl is None else sl


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelLoadError(f"{index}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{path}: no *.safetensors weights found")
        self._handles: dict[str, Any] = {}
        self._where: dict[str, Any] = {}
        for fname in files:
            fpath = path / fname
            try:
                handle = safe_open(str(fpath), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ModelLoadError(f"{fpath}: cannot read safetensors file ({e})") from None
            self._handles[fname] = handle
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                self._where[key] = handle

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def reader(self, name: str) -> Reader:
        sl = self._where[name].get_slice(name)

        def read(rows: slice | None, cols: slice | None) -> torch.Tensor:
            if len(sl.get_shape()) == 1:
                return sl[_index(rows)].float()
            return sl[_index(rows), _index(cols)].float()

        return read


_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name_from_gguf(name: str) -> str | None:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = _GGUF_LAYER.match(name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


class GGUFCheckpoint(Checkpoint):
    """GGUF tensors with llama.cpp's conventions undone: Q/K rows un-permuted (llama.cpp stores
    them interleaved for its rotary kernel) and shapes in torch order [out, in]."""

    # Rows dequantized per call while reading a column slice: bounds the fp32 temporary.
    CHUNK_ROWS = 1024

    def __init__(self, gguf_file: GGUFFile, permuted_heads: dict[str, int]) -> None:
        """`permuted_heads` maps 'q'/'k' to their head counts for the un-permutation."""
        self.path, self._file = gguf_file.path, gguf_file
        self._tensors = {}
        for t in gguf_file.tensors.values():
            hf = hf_name_from_gguf(t.name)
            if hf is not None:
                self._tensors[hf] = t
        self._heads = permuted_heads

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def _heads_of(self, name: str) -> int | None:
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            return self._heads.get("q")
        if name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            return self._heads.get("k")
        return None

    def reader(self, name: str) -> Reader:
        from gguf import GGMLQuantizationType, quants

        t = self._tensors[name]
        shape, qtype = t.shape, GGMLQuantizationType(t.qtype)
        heads = self._heads_of(name)
        data = self._file.data(t.name)
        plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(qtype)

        def dequant(rows: slice) -> np.ndarray:
            if plain is not None:
                return data.view(plain)[rows].astype(np.float32)
            if len(shape) == 1:
                return quants.dequantize(data, qtype)[rows]
            return quants.dequantize(data[rows], qtype)

        def read(rows: slice | None, cols: slice | None) -> torch.Tensor:
            rows = slice(0, shape[0]) if rows is None else rows
            r0, r1 = rows.start or 0, shape[0] if rows.stop is None else rows.stop
            if len(shape) == 1:
                out = torch.from_numpy(dequant(slice(r0, r1)).copy())
            elif cols is None:
                out = torch.from_numpy(dequant(slice(r0, r1)).reshape(r1 - r0, shape[1]))
            else:
                width = len(range(*cols.indices(shape[1])))
                out = torch.empty(r1 - r0, width)
                for c in range(r0, r1, self.CHUNK_ROWS):
                    ce = min(r1, c + self.CHUNK_ROWS)
                    full = torch.from_numpy(dequant(slice(c, ce)).reshape(ce - c, shape[1]))
                    out[c - r0 : ce - r0] = full[:, cols]
            if heads:
                out = _unpermute(out, heads, shape[0], r0, r1)
            return out

        return read


def _unpermute(w: torch.Tensor, heads: int, total_rows: int, r0: int, r1: int) -> torch.Tensor:
    """Undo llama.cpp's reshape(heads, 2, d/2, ...).swapaxes(1, 2) for whole heads [r0, r1)."""
    head_dim = total_rows // heads
    if r0 % head_dim or r1 % head_dim:
        raise ModelLoadError(f"internal: Q/K rows {r0}:{r1} are not aligned to heads of {head_dim}")
    n = (r1 - r0) // head_dim
    rest = w.shape[1:]
    return w.reshape(n, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()
