"""`shardserve rank`: ranks of a tensor-parallel group that live on another machine (or pod).

They join the leader's torch.distributed group through `--dist-init`, receive the model settings
and every step's plan from rank 0, and exit when the leader stops. Kubernetes LeaderWorkerSet
runs this in each worker pod (deploy/k8s/multinode)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from app.worker.worker import RemoteRank, worker_main


def run_remote_ranks(
    dist_init: str,
    tp: int,
    rank_offset: int,
    local_ranks: int,
    device: str = "auto",
    model: Path | None = None,
) -> int:
    if not 0 < rank_offset < tp or rank_offset + local_ranks > tp:
        raise ValueError(
            f"ranks {rank_offset}..{rank_offset + local_ranks - 1} do not fit in --tp {tp} (rank 0 is the leader's)"
        )
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see app/worker/pool.py
    remote = RemoteRank(dist_init, tp, device, max(1, (os.cpu_count() or 1) // local_ranks), model)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker_main, args=(rank, None, None, remote), name=f"rank{rank}")
        for rank in range(rank_offset, rank_offset + local_ranks)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)
