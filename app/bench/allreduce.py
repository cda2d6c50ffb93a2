"""Micro-benchmark: shared-memory vs gloo all-reduce between real rank processes.

`shardserve bench kernels` calls `bench_allreduce`; it spawns its own ranks on loopback.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from app.device import Device
from app.worker.comm import Communicator, DistCommunicator, init_distributed, make_communicator


def _time_calls(comm: Communicator, numel: int, iters: int) -> list[float]:
    src, x = torch.randn(numel), torch.empty(numel)
    for _ in range(min(iters, 50)):  # warm-up: first rounds page in the segment and gloo's buffers
        comm.all_reduce(x.copy_(src))
    comm.barrier()
    times = []
    for _ in range(iters):
        x.copy_(src)  # like the model, every call brings fresh data (and sums stay finite)
        t0 = time.perf_counter_ns()
        comm.all_reduce(x)
        times.append((time.perf_counter_ns() - t0) / 1000)
    return times


def _bench_rank(rank: int, world: int, port: int, numel: int, iters: int, out: str) -> None:
    torch.set_num_threads(1)
    device = Device.resolve("cpu")
    init_distributed(device, rank, world, f"tcp://127.0.0.1:{port}", timeout_s=120)
    name = f"shardserve-bench-{os.getppid()}-{uuid.uuid4().hex[:12]}"
    name = DistCommunicator(device, rank, world).broadcast_object(name)
    shm = make_communicator(device, rank, world, shm_name=name, local=True, max_elems=max(numel, 1))
    results = {"shm": _time_calls(shm, numel, iters)}
    shm.close()
    results["gloo"] = _time_calls(DistCommunicator(device, rank, world), numel, iters)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_us": statistics.median(ordered),
        "p90_us": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "mean_us": statistics.fmean(ordered),
    }


def bench_allreduce(world_size: int = 2, numel: int = 576, iters: int = 1000) -> dict:
    """Latency of one fp32 all-reduce of `numel` values, as seen by rank 0, in microseconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "bench.pt")
        mp.spawn(_bench_rank, args=(world_size, port, numel, iters, out), nprocs=world_size, join=True)
        results = torch.load(out)
    return {
        "world_size": world_size,
        "numel": numel,
        "iters": iters,
        **{kind: _summary(times) for kind, times in results.items()},
    }


if __name__ == "__main__":
    print(bench_allreduce())
