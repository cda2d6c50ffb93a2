"""Shared-memory all-reduce for ranks on one machine (CPU), about 20x faster than gloo here.

Segment layout (one segment per pool, name chosen by the pool):

    [0, 64)                      header: magic, version, world_size, slot_bytes (int64)
    64 + 64*r                    rank r's line: flag, count[2], rows[2] (int64); only r writes it
    data_off + (p*N + r)*slot    slot[p][r]: rank r's payload of a round with parity p

Protocol of round `seq` (1, 2, 3, ... on every rank, in the same order of collectives):
  1. write the payload into slot[seq % 2][rank] and its shape into count/rows[seq % 2];
  2. publish: flag[rank] = seq;
  3. wait until flag[q] >= seq for every q;
  4. read every slot[seq % 2][q]; the sum is taken in rank order 0..N-1 on every rank, so all
     ranks get bitwise-identical results.

Why one barrier per round is enough (double buffering): a rank writes slot[p][r] again at
round seq+2, and only after it has passed round seq+1's wait, i.e. after every rank published
seq+1, which each did only after finishing its reads of round seq. So nobody reads a slot while
it is rewritten, and no second "done reading" barrier is needed.

The round number is not counted here but read from flag[rank] (only this rank writes it, and it
holds the last round this rank published): the C++ kernels run rounds on the same segment from
inside their decoder-layer call (`native()`, app/kernels/csrc/shm_allreduce.h: same layout, same
rank-order fp32 sum, so the same bits), and the two sides must agree on the next round.

Memory ordering: we rely on x86-64 TSO. Stores become visible to other cores in program order
(payload before flag), loads are not reordered with older loads (flag before payload), and a
store is not reordered before older loads (a rank's reads of round seq come before its flag of
seq+1). Each int64 flag is aligned and written by one 8-byte store, so it is never torn. The
payload copy and the flag store are separate opaque C calls, so the compiler cannot reorder
them either. Weakly ordered CPUs (ARM, POWER) would need fences that Python cannot issue: the
factory in comm.py uses gloo there instead.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

_MAGIC = 0x5348524453455256  # "SHRDSERV"
_VERSION = 1
_LINE = 64  # one cache line per rank: flags never share a line (no false sharing)
_PAGE = 4096
_SPIN_ITERS = 200  # ~10 us of pure spinning: a peer on its own core is usually there by then
_YIELD_SECONDS = 0.002  # then yield: ~1 us when the core is ours alone, and lets an oversubscribed peer run
_SLEEP_SECONDS = 50e-6  # then sleep, so a long wait does not burn a core others need


_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.int32: np.int32,
    torch.int64: np.int64,
}  # bfloat16 has no numpy twin: it takes the torch path


def _torch_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


@dataclass(frozen=True)
class _Backend:
    """Slot views and the two ops of the data path, for one dtype."""

    is_torch: bool
    slots: list[list[Any]]  # [parity][rank] 1-D views of a whole slot (np.ndarray or Tensor)
    add: Callable[..., Any]  # add(a, b, out=out), np.add or torch.add
    copy: Callable[[Any, Any], None]  # copy(dst, src)


class CommTimeout(RuntimeError):
    """A peer did not reach a collective in time (it died, hung or called a different one)."""


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _layout(world_size: int, max_elems: int) -> tuple[int, int, int]:
    """(data offset, slot bytes, total bytes); slots hold max_elems fp32 values."""
    data_off = _round_up(_LINE + _LINE * world_size, _PAGE)
    slot = _round_up(max(max_elems, 1) * 4, _PAGE)
    return data_off, slot, data_off + 2 * world_size * slot


_track_lock = threading.Lock()


@contextmanager
def _untracked() -> Iterator[None]:
    """Keep multiprocessing's resource tracker out of our segments (Python < 3.13).

    Ranks share the pool's tracker; its register/unregister calls from several ranks interleave
    and it then unlinks live segments or prints KeyErrors. The pool owns cleanup instead.
    """
    if sys.version_info >= (3, 13):
        yield
        return
    with _track_lock:
        register, unregister = resource_tracker.register, resource_tracker.unregister
        resource_tracker.register = resource_tracker.unregister = lambda *_a, **_k: None
        try:
            yield
        finally:
            resource_tracker.register, resource_tracker.unregister = register, unregister


def _open(name: str, create: bool = False, size: int = 0) -> SharedMemory:
    with _untracked():
        if sys.version_info >= (3, 13):
            return SharedMemory(name, create=create, size=size, track=False)
        return SharedMemory(name, create=create, size=size)


def cleanup(name: str) -> bool:
    """Unlink a pool's segment after its ranks died; True if there was one to remove."""
    try:
        shm = _open(name)
    except FileNotFoundError:
        return False
    with _untracked():
        shm.unlink()
    shm.close()
    return True


class ShmAllReduce:
    """One rank's handle on the pool's segment; rank 0 creates it, the others attach."""

    def __init__(self, shm: SharedMemory, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        magic, version, world, slot = struct.unpack_from("4q", shm.buf, 0)
        data_off = _round_up(_LINE + _LINE * world_size, _PAGE)
        valid = (magic, version, world) == (_MAGIC, _VERSION, world_size)
        if not valid or shm.size < data_off + 2 * world * slot:
            shm.close()
            raise ValueError(f"shared memory {shm.name!r} is not a {world_size}-rank segment")
        self._shm = shm
        self._slot_bytes = slot
        self._data_off = data_off
        # numpy holds a buffer export, so shm.close() cannot unmap under a live view (a torch
        # frombuffer view holds none and would dangle).
        self._np = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)
        # A memoryview reads and writes plain ints straight from memory, ~3x cheaper than numpy
        # scalars in the spin loop; it is also an export that close() releases.
        self._lines = memoryview(self._np[: self._data_off]).cast("q")
        self._line = [(_LINE + _LINE * q) // 8 for q in range(world_size)]  # int64 index of flag[q]
        self._others = [q for q in range(world_size) if q != rank]
        self._data = torch.from_numpy(self._np[self._data_off :])
        self._views: dict[tuple[torch.dtype, bool], _Backend] = {}
        self._broken: str | None = None
        self._native: Any = None

    @classmethod
    def create(cls, name: str, world_size: int, max_elems: int, timeout_s: float = 30.0) -> ShmAllReduce:
        """Rank 0: make the segment (fails if the name exists: names are unique per pool)."""
        _data_off, slot, total = _layout(world_size, max_elems)
        shm = _open(name, create=True, size=total)  # the kernel zero-fills: every flag starts at 0
        struct.pack_into("4q", shm.buf, 0, _MAGIC, _VERSION, world_size, slot)
        return cls(shm, 0, world_size, timeout_s)

    @classmethod
    def attach(cls, name: str, rank: int, world_size: int, timeout_s: float = 30.0) -> ShmAllReduce:
        return cls(_open(name), rank, world_size, timeout_s)

    @property
    def name(self) -> str:
        return self._shm.name

    def unlink(self) -> None:
        """Remove the name; mappings stay valid. Called once every rank has attached."""
        with _untracked():
            self._shm.unlink()

    def native(self) -> Any:
        """This segment as the C++ kernels drive it (`app.kernels._C.SharedAllReduce`), made once;
        None without the extension. It holds no mapping of its own: close() detaches it first."""
        if self._native is None:
            from app.kernels import extension

            ext = extension()
            if ext is None or not hasattr(ext, "SharedAllReduce"):
                return None
            address = self._np.ctypes.data
            self._native = ext.SharedAllReduce(
                address, self._shm.size, self.rank, self.world_size, self.timeout_s, CommTimeout
            )
        return self._native

    def capacity(self, dtype: torch.dtype) -> int:
        return self._slot_bytes // dtype.itemsize

    def _backend(self, dtype: torch.dtype, requires_grad: bool = False) -> _Backend:
        """numpy for the dtypes it has: ~1 us per small op here, against ~2.5 us for torch."""
        key = (dtype, requires_grad or dtype not in _NUMPY_DTYPES)
        backend = self._views.get(key)
        if backend is None:
            n, cap = self.world_size, self._slot_bytes
            if key[1]:
                data, item, add, copy = self._data, dtype, torch.add, _torch_copy
            else:
                data, item, add, copy = self._np[self._data_off :], _NUMPY_DTYPES[dtype], np.add, np.copyto
            slots = [
                [data[(p * n + q) * cap : (p * n + q + 1) * cap].view(item) for q in range(n)] for p in (0, 1)
            ]
            backend = _Backend(key[1], slots, add, copy)
            self._views[key] = backend
        return backend

    def _begin(self, count: int, rows: int) -> int:
        if self._broken is not None:
            raise CommTimeout(f"shared-memory communicator unusable after: {self._broken}")
        line = self._line[self.rank]
        seq = self._lines[line] + 1  # see "round number" above
        p = seq & 1
        self._lines[line + 1 + p] = count
        self._lines[line + 3 + p] = rows
        return seq

    def _publish_and_wait(self, seq: int) -> None:
        lines = self._lines
        lines[self._line[self.rank]] = seq  # after the payload: see "Memory ordering" above
        spins = 0
        start = 0.0
        for q in self._others:
            flag = self._line[q]
            while lines[flag] < seq:
                spins += 1
                if spins < _SPIN_ITERS:
                    continue
                now = time.monotonic()
                if start == 0.0:
                    start = now
                elif now - start > self.timeout_s:
                    self._broken = f"rank {q} missed round {seq} (waited {now - start:.1f} s)"
                    raise CommTimeout(f"rank {self.rank}: {self._broken}")
                if now - start < _YIELD_SECONDS:
                    os.sched_yield()
                else:
                    time.sleep(_SLEEP_SECONDS)

    def _peer_shape(self, seq: int, q: int) -> tuple[int, int]:
        line, p = self._line[q], seq & 1
        return self._lines[line + 1 + p], self._lines[line + 3 + p]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (returns `t`); chunked when larger than a slot."""
        work = t if t.is_contiguous() else t.contiguous()
        be = self._backend(t.dtype, t.requires_grad)
        flat = work.view(-1) if be.is_torch else work.numpy().reshape(-1)
        n, cap = t.numel(), self.capacity(t.dtype)
        for start in range(0, max(n, 1), cap):
            m = min(cap, n - start)
            seq = self._begin(n, 0)
            mine = be.slots[seq & 1]
            be.copy(mine[self.rank][:m], flat[start : start + m])
            self._publish_and_wait(seq)
            if start == 0:
                self._check_same(seq, n, 0, "all_reduce numel")
            out = flat[start : start + m]
            # Fixed order 0..N-1 on every rank: identical bits everywhere.
            be.add(mine[0][:m], mine[1][:m], out=out)
            for q in range(2, self.world_size):
                be.add(out, mine[q][:m], out=out)
        if work is not t:
            t.copy_(work)
        return t

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's [..., W_r] along the last dim (widths may differ)."""
        width = t.shape[-1]
        rows = t.numel() // width if width else 0
        seq = self._begin(width, rows)  # round 1: shapes only, so chunking can agree
        self._publish_and_wait(seq)
        shapes = [self._peer_shape(seq, q) for q in range(self.world_size)]
        widths = [w for w, _ in shapes]
        if any(r != rows for _, r in shapes):
            raise ValueError(f"all_gather_last_dim: leading sizes differ across ranks: {shapes}")
        out = torch.empty((rows, sum(widths)), dtype=t.dtype)
        if rows == 0 or max(widths) == 0:
            return out.view(*t.shape[:-1], sum(widths))
        per_chunk = self.capacity(t.dtype) // max(widths)
        if per_chunk == 0:
            raise ValueError(f"all_gather_last_dim: width {max(widths)} exceeds the shared slot")
        be = self._backend(t.dtype, t.requires_grad)
        src = t.reshape(rows, width)
        if not be.is_torch:
            src, out_arr = src.numpy(), out.numpy()
        else:
            out_arr = out
        offsets = [sum(widths[:q]) for q in range(self.world_size)]
        for r0 in range(0, rows, per_chunk):
            k = min(per_chunk, rows - r0)
            seq = self._begin(width, rows)
            mine = be.slots[seq & 1]
            be.copy(mine[self.rank][: k * width].reshape(k, width), src[r0 : r0 + k])
            self._publish_and_wait(seq)
            for q, (w, off) in enumerate(zip(widths, offsets, strict=True)):
                be.copy(out_arr[r0 : r0 + k, off : off + w], mine[q][: k * w].reshape(k, w))
        return out.view(*t.shape[:-1], sum(widths))

    def _check_same(self, seq: int, count: int, rows: int, what: str) -> None:
        shapes = [self._peer_shape(seq, q) for q in range(self.world_size)]
        if any(s != (count, rows) for s in shapes):
            # Every rank sees the same table, so they all raise together instead of desyncing.
            raise ValueError(f"{what} differs across ranks: {[c for c, _ in shapes]}")

    def close(self) -> None:
        """Drop every view, then unmap; safe to call twice."""
        if self._shm is None:
            return
        if self._native is not None:
            self._native.close()
            self._native = None
        self._views.clear()
        self._lines.release()
        self._data = self._lines = self._np = None  # type: ignore[assignment]
        shm, self._shm = self._shm, None
        shm.close()
