"""Weight formats: how a linear layer's weight is stored and multiplied, one class per (device, dtype).

Every format keeps its tensors as plain named buffers (views into the rank's arena) and exposes the
same four operations, so layers and models never branch on dtype:

    specs(out, in)          the buffers it needs (shape, dtype), for the arena's layout
    store(bufs, row0, w)    quantize/convert fp32 rows [row0, row0 + len(w)) into the buffers
    matmul(bufs, x)         x (fp32, [M, in]) @ W.T -> fp32 [M, out]
    rows(bufs, idx)         fp32 rows of W (embedding lookups from a tied lm_head)

On the CPU every format computes through `CpuKernels.linear` (app/kernels) when the kernels are
loaded: fp32 activations, one fixed reduction order per output whatever M, so a row's result never
depends on its batch. Without them (the torch path) each row is its own call of one fixed shape
([1, in]): a library may round a row differently by M, and how differently depends on the CPU
(MKL's sgemm on AVX-512 differs from its AVX2 path), but it computes the same call the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from app.kernels import CpuKernels

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
Bufs = dict[str, torch.Tensor]

DTYPES = ("fp32", "bf16", "fp16", "int8")


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn over each row of x as its own [1, in] call (a fresh, aligned copy): the torch path's batch
    invariance. Rows of one call shape are computed alike by any library; batches are not."""
    if x.shape[0] == 1:
        return fn(x.contiguous())
    return torch.cat([fn(x[i : i + 1].clone()) for i in range(x.shape[0])])


class WeightFormat(ABC):
    name: str
    bytes_per_param: float
    kernels: CpuKernels | None = None  # the C++ kernels when loaded (CPU); None: the torch path

    @abstractmethod
    def specs(self, out_features: int, in_features: int) -> Spec: ...

    @abstractmethod
    def store(self, bufs: Bufs, row0: int, w: torch.Tensor) -> None: ...

    @abstractmethod
    def matmul(self, bufs: Bufs, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def rows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor: ...

    def kernel_operands(self, bufs: Bufs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, per-output scale or None) as the C++ kernels take them (CPU formats only)."""
        if "qweight" in bufs:
            return bufs["qweight"], bufs["scales"]
        return bufs["weight"], None


class Float32(WeightFormat):
    name = "fp32"
    bytes_per_param = 4

    def specs(self, out_features: int, in_features: int) -> Spec:
        return {"weight": ((out_features, in_features), torch.float32)}

    def store(self, bufs: Bufs, row0: int, w: torch.Tensor) -> None:
        bufs["weight"][row0 : row0 + w.shape[0]].copy_(w)

    def __init__(self, kernels: CpuKernels | None = None) -> None:
        self.kernels = kernels

    def matmul(self, bufs: Bufs, x: torch.Tensor) -> torch.Tensor:
        w = bufs["weight"]
        if self.kernels is not None:
            return self.kernels.linear(x, w)
        return rowwise(lambda r: F.linear(r, w), x)

    def rows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, bufs["weight"])


class Half16(WeightFormat):
    """bf16 / fp16 storage: half the bytes of fp32. The kernels widen each weight to fp32 as they
    load it; the torch path widens the whole weight once per call and multiplies each row in fp32
    (16-bit activations would double the logits' error: 1.0% instead of 0.5% on the default model)."""

    bytes_per_param = 2

    def __init__(self, dtype: torch.dtype, cuda: bool = False, kernels: CpuKernels | None = None) -> None:
        self.dtype, self.cuda, self.kernels = dtype, cuda, kernels
        self.name = "bf16" if dtype == torch.bfloat16 else "fp16"

    def specs(self, out_features: int, in_features: int) -> Spec:
        return {"weight": ((out_features, in_features), self.dtype)}

    def store(self, bufs: Bufs, row0: int, w: torch.Tensor) -> None:
        bufs["weight"][row0 : row0 + w.shape[0]].copy_(w)

    def matmul(self, bufs: Bufs, x: torch.Tensor) -> torch.Tensor:
        w = bufs["weight"]
        if self.kernels is not None:
            return self.kernels.linear(x, w)
        if self.cuda:
            return F.linear(x.to(self.dtype), w).float()
        w32 = w.float()
        return rowwise(lambda r: F.linear(r, w32), x)

    def rows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, bufs["weight"]).float()


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ~= q * scale, scale = absmax / 127."""
    absmax = w.abs().amax(dim=1).clamp_min(1e-12)
    scale = absmax / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


PACK_ROWS, PACK_COLS = 4, 16  # app/kernels/csrc/kernel_args.h: W_I8_PACKED


class Int8WeightOnlyCPU(WeightFormat):
    """int8 weights with per-channel fp32 scales. Kernels: fp32 activations, the int8 weight widened
    exactly to fp32, the scale applied once to the finished sum. Torch path:
    `torch._weight_int8pack_mm` (bf16 activations and scales), row by row.

    For the kernels, weights whose shape allows it are stored packed, [out / 4, in / 16, 4, 16]:
    the four outputs of a kernel tile interleaved by 16-byte blocks, so the batch-1 GEMV reads one
    sequential stream (measured ~1.35x the bandwidth of four row streams). Same bytes, same arena."""

    name = "int8"
    bytes_per_param = 1

    def __init__(self, kernels: CpuKernels | None = None) -> None:
        self.kernels = kernels

    def packs(self, out_features: int, in_features: int) -> bool:
        return self.kernels is not None and out_features % PACK_ROWS == 0 and in_features % PACK_COLS == 0

    def specs(self, out_features: int, in_features: int) -> Spec:
        shape: tuple[int, ...] = (out_features, in_features)
        if self.packs(out_features, in_features):
            shape = (out_features // PACK_ROWS, in_features // PACK_COLS, PACK_ROWS, PACK_COLS)
        return {"qweight": (shape, torch.int8), "scales": ((out_features,), torch.float32)}

    def store(self, bufs: Bufs, row0: int, w: torch.Tensor) -> None:
        q, scale = _quantize_rows(w.float())
        n = w.shape[0]
        bufs["scales"][row0 : row0 + n].copy_(scale)
        qw = bufs["qweight"]
        if qw.dim() == 2:
            qw[row0 : row0 + n].copy_(q)
            return
        blocks = q.shape[1] // PACK_COLS
        if row0 % PACK_ROWS == 0 and n % PACK_ROWS == 0:  # whole tiles: one strided copy
            qw[row0 // PACK_ROWS : (row0 + n) // PACK_ROWS].copy_(
                q.view(n // PACK_ROWS, PACK_ROWS, blocks, PACK_COLS).transpose(1, 2)
            )
            return
        for i in range(n):
            r = row0 + i
            qw[r // PACK_ROWS, :, r % PACK_ROWS].copy_(q[i].view(blocks, PACK_COLS))

    def _qrows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor:
        qw = bufs["qweight"]
        if qw.dim() == 2:
            return F.embedding(idx, qw)
        return qw[idx // PACK_ROWS, :, idx % PACK_ROWS].reshape(*idx.shape, -1)

    def matmul(self, bufs: Bufs, x: torch.Tensor) -> torch.Tensor:
        q, scales = bufs["qweight"], bufs["scales"]
        if self.kernels is not None:
            return self.kernels.linear(x, q, scales)
        s16 = scales.to(torch.bfloat16)
        if q.shape[1] % 16:
            # The packed kernel crashes the process (not an exception) when in_features % 16 != 0,
            # which uneven shards of odd-sized models can produce; dequantize those instead.
            w = q.to(torch.bfloat16) * s16[:, None]
            return rowwise(lambda r: F.linear(r.to(torch.bfloat16), w).float(), x)
        return rowwise(lambda r: torch._weight_int8pack_mm(r.to(torch.bfloat16), q, s16).float(), x)

    def rows(self, bufs: Bufs, idx: torch.Tensor) -> torch.Tensor:
        q = self._qrows(bufs, idx).float()
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


def weight_format(
    dtype: str, device_kind: str = "cpu", int8_threshold: float = 0.0, kernels: CpuKernels | None = None
) -> WeightFormat:
    """The one place that maps (served dtype, device, kernels) to a kernel."""
    if dtype == "fp32":
        return Float32(kernels)
    if dtype in ("bf16", "fp16"):
        half = torch.bfloat16 if dtype == "bf16" else torch.float16
        return Half16(half, cuda=device_kind == "cuda", kernels=kernels)
    if dtype == "int8":
        return Int8BitsAndBytes(int8_threshold) if device_kind == "cuda" else Int8WeightOnlyCPU(kernels)
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
