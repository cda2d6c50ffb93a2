"""A rank's main: join the group, load this rank's shard, then serve steps until told to stop.

Messages from the pool arrive pickled on this rank's pipe: a StepPlan to compute, or None to
stop. Rank 0 answers each plan with a StepOutput; a failure inside the forward is answered with
a StepOutput carrying the error (rank 0) or by exiting (other ranks), so the pool never waits on
a silent rank."""

from __future__ import annotations

import logging
import os
import pickle
import resource
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from app.device import Device
from app.engine.types import StepOutput, StepPlan
from app.layers.parallel import TPContext
from app.model.loader import load_model
from app.worker.comm import init_distributed, make_communicator
from app.worker.runner import ModelRunner

log = logging.getLogger("shardserve.worker")


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a rank needs, fixed by the pool before spawning."""

    model_path: Path
    dtype: str
    device: str
    world_size: int
    init_method: str  # torch.distributed rendezvous, tcp://host:port
    shm_name: str | None  # the pool's shared-memory segment (CPU ranks on one machine)
    num_blocks: int
    block_size: int
    max_num_batched_tokens: int
    threads: int
    seed: int
    comm_timeout: float


@dataclass(frozen=True)
class RankReady:
    rank: int
    weight_bytes: int
    kv_cache_bytes: int
    load_seconds: float
    peak_rss_bytes: int  # ru_maxrss after loading: the rank's peak while loading


@dataclass(frozen=True)
class RankFailed:
    rank: int
    error: str


def worker_main(rank: int, args: WorkerArgs, conn: Connection) -> None:
    torch.set_num_threads(args.threads)
    comm = None
    try:
        device = Device.resolve(args.device, rank)
        init_distributed(device, rank, args.world_size, args.init_method)
        comm = make_communicator(
            device,
            rank,
            args.world_size,
            shm_name=args.shm_name,
            local=args.shm_name is not None,
            max_elems=args.max_num_batched_tokens * 8192,
            timeout_s=args.comm_timeout,
        )
        loaded = load_model(
            args.model_path,
            args.dtype,
            TPContext(rank, args.world_size),
            comm,
            device_kind=device.kind,
            alloc=device.alloc_arena,
        )
        runner = ModelRunner(
            loaded,
            num_blocks=args.num_blocks,
            block_size=args.block_size,
            is_driver=rank == 0,
            seed=args.seed,
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        conn.send(RankReady(rank, loaded.weight_bytes, runner.kv_cache_bytes, loaded.load_seconds, peak))
    except Exception as e:  # report, then exit: the pool turns this into a clear start-up error
        conn.send(RankFailed(rank, f"{type(e).__name__}: {e}"))
        log.debug("rank %d failed to start:\n%s", rank, traceback.format_exc())
        return
    _serve(rank, runner, conn)
    if comm is not None:
        comm.close()


def _serve(rank: int, runner: ModelRunner, conn: Connection) -> None:
    while True:
        try:
            plan: StepPlan | None = pickle.loads(conn.recv_bytes())
        except EOFError:  # the pool is gone
            return
        if plan is None:
            return
        try:
            out = runner.execute(plan)
        except Exception as e:
            if rank == 0:
                conn.send_bytes(pickle.dumps(StepOutput(plan.step_id, (), error=f"{type(e).__name__}: {e}")))
            log.error("rank %d step %d failed:\n%s", rank, plan.step_id, traceback.format_exc())
            os._exit(1)  # peers may be blocked in a collective with us: the pool restarts all
        if rank == 0:
            conn.send_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
