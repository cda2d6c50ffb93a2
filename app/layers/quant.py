"""Weight formats: how a linear layer's weight is stored and multiplied, one class per (device, dtype).

Every format keeps its tensors as plain named buffers (views into the rank's arena) and exposes the
same four operations, so layers and models never branch on dtype:

    specs(out, in)          the buffers it needs (shape, dtype), for the arena's layout
    store(bufs, row0, w)    quantize/convert fp32 rows [row0, row0 + len(w)) into the buffers
    matmul(bufs, x)         x (fp32, [M, in]) @ W.T -> fp32 [M, out]
    rows(bufs, idx)         fp32 rows of W (embedding lookups from a tied lm_head)

Measured on this CPU (shared/DESIGN.md, `shardserve bench kernels`): int8 weight-only with bf16
activations (`torch._weight_int8pack_mm`) is the fastest at small M and bitwise batch-invariant;
16-bit matmuls are fast only at M = 1, so 16-bit weights are upcast for larger M.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
Bufs = dict[str, torch.Tensor]

DTYPES = ("fp32", "bf16", "fp16", "int8")


class WeightFormat(ABC):
    name: str
    bytes_per_param: float

    @abstractmethod
    def specs(self, out_features: int, in_features: int) -> Spec: ...

    @abstractmethod
    def store(self, bufs: Bufs, row0: int, w: torch.Tensor) -> None: ...

    @abstractmethod
    def matmul(self, bufs: Bufs, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def rows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor: ...


class Float32(WeightFormat):
    name = "fp32"
    bytes_per_param = 4

    def specs(self, out_features: int, in_features: int) -> Spec:
        return {"weight": ((out_features, in_features), torch.float32)}

    def store(self, bufs: Bufs, row0: int, w: torch.Tensor) -> None:
        bufs["weight"][row0 : row0 + w.shape[0]].copy_(w)

    def matmul(self, bufs: Bufs, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, bufs["weight"])

    def rows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, bufs["weight"])


class Half16(WeightFormat):
    """bf16 / fp16 storage. At M = 1 the 16-bit GEMV reads half the bytes and wins; above it this
    CPU has no fast 16-bit GEMM (0.3 GFLOP/s at 2048^3), so the weight is upcast and sgemm runs."""

    bytes_per_param = 2

    def __init__(self, dtype: torch.dtype, small_m: int | None = 1) -> None:
        self.dtype = dtype
        self.small_m = small_m  # None: always compute in 16 bits (CUDA)
        self.name = "bf16" if dtype == torch.bfloat16 else "fp16"

    def specs(self, out_features: int, in_features: int) -> Spec:
        return {"weight": ((out_features, in_features), self.dtype)}

    def store(self, bufs: Bufs, row0: int, w: torch.Tensor) -> None:
        bufs["weight"][row0 : row0 + w.shape[0]].copy_(w)

    def matmul(self, bufs: Bufs, x: torch.Tensor) -> torch.Tensor:
        w = bufs["weight"]
        if self.small_m is None or x.shape[0] <= self.small_m:
            return F.linear(x.to(self.dtype), w).float()
        return F.linear(x, w.float())

    def rows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, bufs["weight"]).float()


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ~= q * scale, scale = absmax / 127."""
    absmax = w.abs().amax(dim=1).clamp_min(1e-12)
    scale = absmax / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8WeightOnlyCPU(WeightFormat):
    """int8 weights, per-channel bf16 scales, bf16 activations: `torch._weight_int8pack_mm`."""

    name = "int8"
    bytes_per_param = 1

    def specs(self, out_features: int, in_features: int) -> Spec:
        return {
            "qweight": ((out_features, in_features), torch.int8),
            "scales": ((out_features,), torch.bfloat16),
        }

    def store(self, bufs: Bufs, row0: int, w: torch.Tensor) -> None:
        q, scale = _quantize_rows(w.float())
        rows = slice(row0, row0 + w.shape[0])
        bufs["qweight"][rows].copy_(q)
        bufs["scales"][rows].copy_(scale)

    def matmul(self, bufs: Bufs, x: torch.Tensor) -> torch.Tensor:
        q, scales = bufs["qweight"], bufs["scales"]
        if q.shape[1] % 16:
            # The packed kernel crashes the process (not an exception) when in_features % 16 != 0,
            # which uneven shards of odd-sized models can produce; dequantize those instead.
            return F.linear(x.to(torch.bfloat16), q.to(torch.bfloat16) * scales[:, None]).float()
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scales).float()

    def rows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor:
        q = F.embedding(idx, bufs["qweight"]).float()
        return q * F.embedding(idx, bufs["scales"][:, None]).float()


class Int8BitsAndBytes(WeightFormat):
    """CUDA: LLM.int8 through bitsandbytes; `threshold` 0 means pure int8 (no fp16 outliers).

    bitsandbytes keeps the row-wise absmax (SCB) rather than the scale; the int8 weight (CB) is
    the same symmetric per-row quantization as on the CPU path.
    """

    name = "int8"
    bytes_per_param = 1

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = threshold

    def specs(self, out_features: int, in_features: int) -> Spec:
        return {
            "qweight": ((out_features, in_features), torch.int8),
            "absmax": ((out_features,), torch.float32),
        }

    def store(self, bufs: Bufs, row0: int, w: torch.Tensor) -> None:
        q, scale = _quantize_rows(w.float())
        rows = slice(row0, row0 + w.shape[0])
        bufs["qweight"][rows].copy_(q)
        bufs["absmax"][rows].copy_(scale * 127.0)

    def matmul(self, bufs: Bufs, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        state = bnb.MatmulLtState()
        state.CB, state.SCB = bufs["qweight"], bufs["absmax"]
        state.threshold = self.threshold
        state.has_fp16_weights = False
        return bnb.matmul(x.half(), None, state=state).float()

    def rows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor:
        q = F.embedding(idx, bufs["qweight"]).float()
        return q * (F.embedding(idx, bufs["absmax"][:, None]) / 127.0)


def weight_format(dtype: str, device_kind: str = "cpu", int8_threshold: float = 0.0) -> WeightFormat:
    """The one place that maps (served dtype, device) to a kernel."""
    if dtype == "fp32":
        return Float32()
    if dtype in ("bf16", "fp16"):
        return Half16(
            torch.bfloat16 if dtype == "bf16" else torch.float16, 1 if device_kind == "cpu" else None
        )
    if dtype == "int8":
        return Int8BitsAndBytes(int8_threshold) if device_kind == "cuda" else Int8WeightOnlyCPU()
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
