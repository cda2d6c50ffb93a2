"""Rotary position embeddings, Hugging Face's convention (rotate_half over two halves).

GGUF files store Q/K rows permuted for llama.cpp's interleaved convention; the GGUF reader undoes
that permutation, so there is exactly one convention here.

Scaling types follow transformers' modeling_rope_utils: each yields inverse frequencies and a
factor on cos/sin (YaRN's attention scaling; 1 for the others)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_SCALING = ("default", "linear", "dynamic", "yarn", "llama3")


class RopeScalingError(ValueError):
    pass


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(pos_freqs: torch.Tensor, head_dim: int, base: float, s: dict[str, Any], max_positions: int):
    """Frequencies below beta_slow rotations over the original context are interpolated (divided by
    the factor), those above beta_fast kept, a linear ramp in between; cos/sin grow by mscale."""
    orig = int(s["original_max_position_embeddings"])
    factor = float(s.get("factor") or max_positions / orig)

    def mscale(scale: float, k: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over orig
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(float(s.get("beta_fast") or 32)), dim_of(float(s.get("beta_slow") or 1))
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention)


def rope_parameters(
    head_dim: int, base: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], factor applied to cos and sin)."""
    s = scaling or {}
    kind = s.get("rope_type") or s.get("type") or "default"
    if kind not in SUPPORTED_SCALING:
        raise RopeScalingError(
            f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_SCALING)}"
        )
    partial = float(s.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise RopeScalingError(
            f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported"
        )
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    inv_freq = 1.0 / pos_freqs
    if kind == "linear":
        return inv_freq / float(s["factor"]), 1.0
    if kind == "llama3":
        if "freq_factors" in s:  # a GGUF's rope_freqs: llama.cpp divides each frequency by its factor
            factors = torch.tensor(s["freq_factors"], dtype=torch.float32)
            if factors.shape != inv_freq.shape:
                raise RopeScalingError(f"rope_freqs has {len(factors)} values, expected {len(inv_freq)}")
            return inv_freq / factors, 1.0
        return _llama3(inv_freq, s), 1.0
    if kind == "yarn":
        return _yarn(pos_freqs, head_dim, base, s, max_positions)
    # "dynamic" (NTK): transformers rescales the base for seq_len = max(this forward's length,
    # max_position_embeddings), base * (factor * seq_len / max_pos - factor + 1) ** (d / (d - 2)),
    # which is the base itself up to max_position_embeddings. The served context stops there
    # (ModelConfig.context_limit), so the unscaled frequencies are exactly transformers' ones.
    return inv_freq, 1.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once; forward only indexes them.

    The scaling is checked at construction (an unsupported type fails at load), but the tables are
    built on the first forward: a model built only to lay out its arena (costs.py) never pays for
    them (0.8 s and 128 MiB at 131072 positions of head_dim 128)."""

    def __init__(
        self, head_dim: int, max_positions: int, base: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.inv_freq, self.attention_scaling = rope_parameters(head_dim, base, scaling, max_positions)
        self.max_positions = max_positions
        # Plain attributes, not buffers: derived data stays out of the weight arena.
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.sin is None:
            freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return self.cos, self.sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cos, sin = self.tables()
        cos, sin = cos[positions][:, None, :], sin[positions][:, None, :]
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
