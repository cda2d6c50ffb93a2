"""The collectives the model's forward calls, one interface for every device and topology.

- one rank: identity;
- CUDA: NCCL through torch.distributed;
- CPU, every rank on this machine: a shared-memory all-reduce (shm_allreduce.py), since gloo
  takes ~650 us per 576-float all-reduce here and a decode step makes ~60 of them;
- CPU across machines: gloo through torch.distributed.

Control traffic (broadcast_object, barrier) always goes through torch.distributed, whose group
the worker sets up first (`init_distributed`) and tears down after `close()`.
"""

from __future__ import annotations

import datetime
import logging
import platform
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist

from app.device import Device
from app.worker.shm_allreduce import CommTimeout, ShmAllReduce, cleanup

__all__ = [
    "CommTimeout",
    "Communicator",
    "cleanup",
    "init_distributed",
    "make_communicator",
]

log = logging.getLogger(__name__)


class Communicator(ABC):
    """rank, world_size and the collectives; every rank calls them in the same order."""

    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; may work in place and returns the reduced tensor."""

    @abstractmethod
    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's [..., W_r] along the last dim, rank order; W_r may differ."""

    @abstractmethod
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable object, on every rank (control path, not per layer)."""

    @abstractmethod
    def barrier(self) -> None: ...

    def native_all_reduce(self) -> Any:
        """A handle through which the C++ kernels run this communicator's all-reduce inside their
        own call (app/kernels `layer_block`), or None: then the forward calls all_reduce itself."""
        return None

    def close(self) -> None:
        """Release what this communicator owns (not the torch.distributed group)."""
        return None


class SingleCommunicator(Communicator):
    """A lone rank: every collective is the identity."""

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        pass


class DistCommunicator(Communicator):
    """torch.distributed collectives on the default group: NCCL on CUDA, gloo on CPU."""

    def __init__(self, device: Device, rank: int, world_size: int) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_distributed first")
        self.rank, self.world_size = rank, world_size
        self._device = device
        self._torch_device = device.torch_device()
        # NCCL's object collectives stage pickles on the GPU; gloo's on the host.
        self._object_device = self._torch_device if device.kind == "cuda" else None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            dist.all_reduce(t)
            return t
        flat = t.contiguous()
        dist.all_reduce(flat)
        return t.copy_(flat)

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        # all_gather wants equal shapes: exchange widths, pad to the widest, slice back.
        width = torch.tensor([t.shape[-1]], dtype=torch.int64, device=t.device)
        widths_t = [torch.empty_like(width) for _ in range(self.world_size)]
        dist.all_gather(widths_t, width)
        widths = [int(w.item()) for w in widths_t]
        wmax = max(widths)
        padded = t.new_zeros((*t.shape[:-1], wmax))
        padded[..., : t.shape[-1]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[..., :w] for p, w in zip(parts, widths, strict=True)], dim=-1)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._object_device)
        return box[0]

    def barrier(self) -> None:
        if self._device.kind == "cuda":
            dist.barrier(device_ids=[self._torch_device.index])
        else:
            dist.barrier()


class ShmCommunicator(DistCommunicator):
    """CPU ranks on one machine: data collectives over shared memory, control over gloo."""

    def __init__(
        self, device: Device, rank: int, world_size: int, *, shm_name: str, max_elems: int, timeout_s: float
    ) -> None:
        super().__init__(device, rank, world_size)
        err: str | None = None
        shm: ShmAllReduce | None = None
        if rank == 0:
            try:
                shm = ShmAllReduce.create(shm_name, world_size, max_elems, timeout_s)
            except Exception as e:  # every rank must learn of it, or they hang in the gather below
                err = f"rank 0 could not create {shm_name!r}: {e!r}"
        err = self.broadcast_object(err)
        if err is None and rank != 0:
            try:
                shm = ShmAllReduce.attach(shm_name, rank, world_size, timeout_s)
            except Exception as e:
                err = f"rank {rank} could not attach {shm_name!r}: {e!r}"
        errors = [None] * world_size
        dist.all_gather_object(errors, err)
        if rank == 0 and shm is not None:
            # Everyone has it mapped (or gave up): drop the name now, so no crash can leak it.
            shm.unlink()
        failures = [e for e in errors if e is not None]
        if failures:
            if shm is not None:
                shm.close()
            raise RuntimeError("; ".join(dict.fromkeys(failures)))
        assert shm is not None
        self._shm = shm

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self._shm.all_reduce(t)

    def native_all_reduce(self) -> Any:
        return self._shm.native()

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        return self._shm.all_gather_last_dim(t)

    def close(self) -> None:
        self._shm.close()


def init_distributed(
    device: Device, rank: int, world_size: int, init_method: str, timeout_s: float = 600.0
) -> None:
    """Join the pool's torch.distributed group (rendezvous and control traffic)."""
    if device.kind == "cuda":
        torch.cuda.set_device(device.torch_device())
    dist.init_process_group(
        backend=device.dist_backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _shm_is_safe() -> bool:
    """The shared-memory protocol relies on x86-64's store and load ordering (TSO)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def make_communicator(
    device: Device,
    rank: int,
    world_size: int,
    *,
    shm_name: str | None,
    local: bool,
    max_elems: int,
    timeout_s: float = 30.0,
) -> Communicator:
    """The fastest correct communicator for this rank; collective over all ranks (call on each).

    shm_name: a segment name unique to the pool (e.g. f"shardserve-{pid}-{uuid}"), used only
    for CPU ranks that all share this machine (`local`). max_elems: the largest fp32 tensor
    reduced in one round; larger ones are split into several rounds. timeout_s: how long a
    shared-memory collective waits for a peer before raising CommTimeout.
    """
    if world_size == 1:
        return SingleCommunicator()
    if device.kind == "cpu" and local and shm_name is not None:
        if _shm_is_safe():
            return ShmCommunicator(
                device, rank, world_size, shm_name=shm_name, max_elems=max_elems, timeout_s=timeout_s
            )
        log.warning("shared-memory all-reduce needs x86 ordering; using gloo on %s", platform.machine())
    return DistCommunicator(device, rank, world_size)
