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
    def _reader(self, name: str) -> Reader: ...

    def stored_name(self, name: str) -> str:
        """The tensor's name in the file itself (for messages)."""
        return name

    def reader(self, name: str) -> Reader:
        """Slices of `name` as fp32, each checked for NaN and infinity as it is converted: a single
        flipped exponent bit loads fine and serves garbage (a logprob of -9999 and empty text), so a
        corrupt weight refuses to load instead, naming the tensor. One pass over each fp32 slice
        (slices are host memory: the uploader moves them to the device afterwards)."""
        read = self._reader(name)

        def checked(rows: slice | None, cols: slice | None) -> torch.Tensor:
            out = read(rows, cols)
            # numpy's isfinite, not torch's: measured 7-24 GB/s against torch's 0.1-0.7 on this CPU
            if not np.isfinite(out.numpy()).all():
                raise ModelLoadError(
                    f"{self.path}: tensor {self.stored_name(name)} holds NaN or infinite values; "
                    "the file is corrupt"
                )
            return out

        return checked

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

    def _reader(self, name: str) -> Reader:
        sl = self._where[name].get_slice(name)

        def read(rows: slice | None, cols: slice | None) -> torch.Tensor:
            if len(sl.get_shape()) == 1:
                return sl[_index(rows)].float()
            return sl[_index(rows), _index(cols)].float()

        return read


_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GGUF_TOP_NAME = re.compile(r"(\w+)\.(weight|bias)$")
# GGUF names per llama.cpp architecture -> Hugging Face names (layer parts, then top-level ones).
_LLAMA_LAYER = {
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
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_TOP = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_GGUF_NAMES = {  # general.architecture -> (layer map, layer prefix, top-level map)
    "llama": (_LLAMA_LAYER, "model.layers", _LLAMA_TOP),
    "qwen2": (_LLAMA_LAYER, "model.layers", _LLAMA_TOP),
    "gpt2": (_GPT2_LAYER, "transformer.h", _GPT2_TOP),
}
# llama.cpp stores these as Linear weights [out, in]; Hugging Face's GPT-2 keeps Conv1D [in, out].
_GGUF_CONV1D = {"gpt2": {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}}
# Architectures whose converter permutes Q/K rows for llama.cpp's interleaved rotary kernel.
# Qwen2 uses NEOX-style rotation (HF's rotate_half) and is converted unpermuted.
_GGUF_PERMUTED_QK = {"llama"}


def hf_name_from_gguf(name: str, arch: str = "llama") -> str | None:
    layer_map, prefix, top = _GGUF_NAMES.get(arch, _GGUF_NAMES["llama"])
    m = _GGUF_LAYER.match(name)
    if m:
        part = layer_map.get(m.group(2))
        return f"{prefix}.{m.group(1)}.{part}.{m.group(3)}" if part else None
    m = _GGUF_TOP_NAME.match(name)
    if m and m.group(1) in top:
        return f"{top[m.group(1)]}.{m.group(2)}"
    return None


def _is_conv1d(name: str, arch: str) -> bool:
    m = _GGUF_LAYER.match(name)
    return bool(m) and m.group(3) == "weight" and m.group(2) in _GGUF_CONV1D.get(arch, ())


def gguf_permutes_qk(gguf_file: GGUFFile) -> bool:
    return gguf_file.fields.get("general.architecture") in _GGUF_PERMUTED_QK


def gguf_rope_freqs(gguf_file: GGUFFile) -> list[float] | None:
    """Llama 3's rope scaling as llama.cpp's converter stores it: not in metadata but as a small
    F32 tensor of per-frequency divisors, `rope_freqs` (head_dim / 2 values)."""
    t = gguf_file.tensors.get("rope_freqs.weight")
    if t is None:
        return None
    if t.qtype != 0:  # GGML F32: the converter always writes it so
        raise ModelLoadError(f"{gguf_file.path}: rope_freqs.weight is not F32 (type {t.qtype})")
    return gguf_file.data(t.name).view(np.float32).astype(float).tolist()


def checkpoint_names(model: Any, names: list[str]) -> dict[str, str]:
    """Loader key -> the checkpoint's own name for it: a family may accept several spellings
    of one tensor (its `canonical_name`), e.g. GPT-2 files with or without `transformer.`."""
    canonical = getattr(model, "canonical_name", None)
    return {canonical(n): n for n in names} if canonical else {n: n for n in names}


class GGUFCheckpoint(Checkpoint):
    """GGUF tensors with llama.cpp's conventions undone: Q/K rows un-permuted where its converter
    permuted them (interleaved for its rotary kernel), GPT-2's projections back in Conv1D layout,
    shapes in torch order."""

    # Rows dequantized per call while reading a column slice: bounds the fp32 temporary.
    CHUNK_ROWS = 1024

    def __init__(self, gguf_file: GGUFFile, permuted_heads: dict[str, int]) -> None:
        """`permuted_heads` maps 'q'/'k' to their head counts for the un-permutation (empty when
        the file's converter did not permute: see gguf_permutes_qk)."""
        self.path, self._file = gguf_file.path, gguf_file
        arch = gguf_file.fields.get("general.architecture", "llama")
        self._tensors = {}
        self._transposed: set[str] = set()
        for t in gguf_file.tensors.values():
            hf = hf_name_from_gguf(t.name, arch)
            if hf is not None:
                self._tensors[hf] = t
                if _is_conv1d(t.name, arch):
                    self._transposed.add(hf)
        self._heads = permuted_heads

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self._tensors[name].shape
        return tuple(reversed(shape)) if name in self._transposed else shape

    def _heads_of(self, name: str) -> int | None:
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            return self._heads.get("q")
        if name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            return self._heads.get("k")
        return None

    def stored_name(self, name: str) -> str:
        return self._tensors[name].name

    def _reader(self, name: str) -> Reader:
        read = self._stored_reader(name)
        if name in self._transposed:
            return lambda rows, cols: read(cols, rows).t()
        return read

    def _stored_reader(self, name: str) -> Reader:
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
