"""The batch-1 decode floor: every linear weight is read once per step, so a step cannot take less
than (weight bytes read per step) / (memory bandwidth). 32 GB/s is this machine's measured read
bandwidth (shared/DESIGN.md); pass another with --bandwidth-gbs.

Counted: every 2-D weight of attention and MLP plus the LM head (the tied embedding when there is
no separate head). Not counted: the embedding lookup (one row per token), norms, the KV cache and
int8's per-channel scales: together well under 1% of the bytes for the default model at short
contexts."""

from __future__ import annotations

from pathlib import Path

from app.model.costs import part_of, read_tensor_headers

DEFAULT_BANDWIDTH_GBS = 32.0
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "int8": 1}


def decode_weight_bytes(model: Path) -> dict[str, int]:
    """dtype -> bytes read per decode step; "file" is the checkpoint's own encoding (e.g. Q4_1)."""
    headers = read_tensor_headers(model)
    parts = {name: part_of(name) for name in headers}
    has_head = "lm_head" in parts.values()
    linear = [
        h
        for name, h in headers.items()
        if len(h.shape) == 2
        and (parts[name] in ("attention", "mlp", "lm_head") or (parts[name] == "embeddings" and not has_head))
        and name not in ("wpe.weight", "transformer.wpe.weight")  # GPT-2's positions: one row per token
    ]
    params = sum(h.numel for h in linear)
    out = {dtype: params * b for dtype, b in BYTES_PER_PARAM.items()}
    out["file"] = sum(h.file_bytes for h in linear)
    return out


def roofline(model: Path, bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS) -> list[dict]:
    """One row per dtype: bytes per step, the floor in ms and the batch-1 ceiling in tokens/s."""
    rows = []
    for dtype, nbytes in decode_weight_bytes(model).items():
        floor_ms = nbytes / (bandwidth_gbs * 1e9) * 1000
        rows.append({"dtype": dtype, "bytes": nbytes, "floor_ms": floor_ms, "max_tok_s": 1000 / floor_ms})
    return rows


def roofline_line(rows: list[dict], bandwidth_gbs: float, tpot_ms: float | None = None) -> str:
    """'roofline at 32 GB/s, batch-1 floor: fp32 16.8 ms · ...' and, given a TPOT, how far off it is."""
    floors = " · ".join(f"{r['dtype']} {r['floor_ms']:.1f} ms ({r['bytes'] / 1e6:.0f} MB)" for r in rows)
    line = f"roofline at {bandwidth_gbs:g} GB/s, batch-1 decode floor: {floors}"
    if tpot_ms:
        ratios = ", ".join(f"{tpot_ms / r['floor_ms']:.1f}× {r['dtype']}" for r in rows)
        line += f"; median TPOT {tpot_ms:.1f} ms = {ratios}"
    return line
