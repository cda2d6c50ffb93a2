"""cpu | cuda: the one place (with the quant kernels) that knows which device we run on.

Everything else asks a `Device` for its backend, buffers and hints, so the model, loader and
communicator stay device-blind. Every `torch.cuda` call sits behind `kind == "cuda"`: on the
CPU-only wheel `torch.cuda.*` raises, and `pin_memory` is a silent no-op.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Literal

import torch

DeviceKind = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class Device:
    """A resolved device kind; `index` is the CUDA ordinal fixed by `resolve` (None on CPU)."""

    kind: DeviceKind
    index: int | None = None

    @classmethod
    def resolve(cls, name: str = "auto", rank: int = 0) -> Device:
        """ "auto" picks CUDA when available; a bare "cuda" gives rank r the GPU r mod count.

        `rank` is the rank's index on its own machine (local rank), since GPUs are per host.
        """
        name = name.strip().lower()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            return cls("cpu")
        if name == "cuda" or name.startswith("cuda:"):
            if not torch.cuda.is_available():
                raise ValueError(f"device {name!r} requested but CUDA is not available")
            count = torch.cuda.device_count()
            index = int(name.split(":", 1)[1]) if ":" in name else rank % count
            if not 0 <= index < count:
                raise ValueError(f"device {name!r}: only {count} CUDA device(s)")
            return cls("cuda", index)
        raise ValueError(f"unknown device {name!r} (expected auto, cpu, cuda or cuda:N)")

    def torch_device(self, rank: int | None = None) -> torch.device:
        """This rank's torch.device; `rank` overrides the resolved index (GPU rank mod count)."""
        if self.kind == "cpu":
            return torch.device("cpu")
        index = self.index if rank is None else rank % torch.cuda.device_count()
        return torch.device("cuda", index)

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.kind == "cuda" else "gloo"

    @property
    def auto_weight_dtype(self) -> str:
        """What `--dtype auto` means here: the fastest dtype measured for this device kind."""
        return "bf16" if self.kind == "cuda" else "int8"

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer on this device, for a rank's weight arena or its KV cache. On CPU a fresh
        anonymous mapping: page-aligned (mmap/madvise and SIMD loads like it) and costing memory
        only as its pages are first written, which torch's allocator does not promise (malloc may
        serve even a large request from a freed, still resident part of its heap: after a model
        load it often does). The tensor keeps the mapping alive."""
        if self.kind == "cuda":
            return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device())
        if nbytes <= 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)

    def uploader(self) -> Uploader:
        """Moves checkpoint slices (host fp32) to this device while the model loads."""
        return Uploader(self)

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.torch_device())

    def free_memory_bytes(self) -> int:
        """Memory a new allocation can use now: MemAvailable on CPU, free device memory on CUDA."""
        if self.kind == "cuda":
            free, _total = torch.cuda.mem_get_info(self.torch_device())
            return int(free)
        return _host_available_bytes()


class Uploader:
    """Host slices -> device tensors. On CUDA every slice goes through one reusable pinned staging
    buffer with a non-blocking copy, so reading and converting the next slice on the CPU overlaps
    the transfer; on CPU a slice is already where it belongs and nothing is copied."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._staging: torch.Tensor | None = None
        self._event = None

    def upload(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.kind == "cpu":
            return t
        nbytes = t.numel() * t.element_size()
        if self._event is not None:
            self._event.synchronize()  # the previous copy must be done before the buffer is reused
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        staged = self._staging[:nbytes].view(t.dtype).view(t.shape)
        staged.copy_(t)
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device.torch_device())
        out.copy_(staged, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return out


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    # Not Linux (or a very old kernel): free pages undercount reclaimable cache, but never lie high.
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
