"""A rank's main: join the group, load this rank's shard, then serve steps until told to stop.

Messages from the pool arrive pickled on this rank's pipe: a StepPlan to compute, or None to
stop. Rank 0 answers each plan with a StepOutput; a failure inside the forward is answered with
a StepOutput carrying the error (rank 0) or by exiting (other ranks), so the pool never waits on
a silent rank.

Ranks on other machines (`shardserve rank --dist-init ...`) join the same torch.distributed
group; then rank 0 broadcasts each plan to all ranks over it (see WorkerArgs.remote)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import resource
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from app.device import Device
from app.engine.types import StepOutput, StepPlan
from app.kernels import describe, load_kernels
from app.layers.parallel import TPContext
from app.model.loader import load_model
from app.model.memory import kv_cache_dtype
from app.settings import Settings
from app.worker.comm import init_distributed, make_communicator
from app.worker.faults import Fault
from app.worker.runner import ModelRunner

log = logging.getLogger("shardserve.worker")


@dataclass(frozen=True)
class RankLaunch:
    """What the pool decided for one launch of the ranks (Settings say the rest)."""

    model_path: Path
    dtype: str  # resolved: never "auto"
    num_blocks: int  # KV cache blocks, sized by the stack from memory or --kv-cache-tokens
    init_method: str  # torch.distributed rendezvous, tcp://host:port
    shm_name: str | None  # the pool's shared-memory segment (CPU ranks on one machine)
    threads: int
    # Some ranks live in other process trees (other pods/machines, joined through --dist-init):
    # plans then reach every rank through a torch.distributed broadcast from rank 0 instead of
    # pipes, and the per-layer collectives use gloo/NCCL instead of shared memory.
    remote: bool = False


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a rank needs, fixed by the pool before spawning: the server's Settings (tp,
    device, kernels, block size, step budget, seed, step timeout) and this launch."""

    settings: Settings
    launch: RankLaunch


@dataclass(frozen=True)
class RankReady:
    rank: int
    weight_bytes: int
    kv_cache_bytes: int
    load_seconds: float
    peak_rss_bytes: int  # ru_maxrss after loading: the rank's peak while loading
    compute: str = "torch"  # the compute path this rank runs (app/kernels.describe)
    kv_cache_resident_bytes: int | None = None  # of kv_cache_bytes, what is in RAM (None: unknown)


@dataclass(frozen=True)
class RankFailed:
    rank: int
    error: str


def worker_main(
    rank: int, args: WorkerArgs | None, conn: Connection | None, remote: RemoteRank | None = None
) -> None:
    """A rank started by the pool (args and a pipe) or by `shardserve rank` (remote: no pipe; the
    arguments arrive from rank 0 once the group is joined)."""
    # Ctrl+C in a terminal signals the whole process group; the server drains and stops the ranks
    # itself, so a rank must not die of that signal mid-request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    comm = None
    try:
        if args is None:
            assert remote is not None
            torch.set_num_threads(remote.threads)
            init_distributed(Device.resolve(remote.device, rank), rank, remote.world_size, remote.init_method)
            args = _broadcast(None)
            if remote.model_path is not None:
                args = dataclasses.replace(
                    args, launch=dataclasses.replace(args.launch, model_path=remote.model_path)
                )
        else:
            torch.set_num_threads(args.launch.threads)
            init_distributed(
                Device.resolve(args.settings.device, rank), rank, args.settings.tp, args.launch.init_method
            )
            if args.launch.remote:
                args = _broadcast(args)
        s, launch = args.settings, args.launch
        device = Device.resolve(s.device, rank)
        comm = make_communicator(
            device,
            rank,
            s.tp,
            shm_name=launch.shm_name,
            local=launch.shm_name is not None,
            max_elems=s.max_num_batched_tokens * 8192,
            timeout_s=s.step_timeout,
        )
        kernels = load_kernels(s.kernels, launch.threads) if device.kind == "cpu" else None
        if kernels is not None:
            # The kernels' own team computes everything heavy; torch's OpenMP threads would only
            # add wake-ups (~56 us each, passive) to the small element-wise ops left to torch.
            torch.set_num_threads(1)
        loaded = load_model(
            launch.model_path,
            launch.dtype,
            TPContext(rank, s.tp),
            comm,
            device=device,
            kernels=kernels,
            progress=rank == 0 and sys.stderr.isatty(),  # one bar, and only for a person watching
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the KV cache
        fault = Fault.from_env(rank)  # a malformed SHARDSERVE_FAULT is a start-up error
        kv_dtype = kv_cache_dtype(launch.dtype, kernels is not None)
        runner = ModelRunner(
            loaded,
            num_blocks=launch.num_blocks,
            block_size=s.block_size,
            is_driver=rank == 0,
            seed=s.seed,
            kv_dtype=torch.float16 if kv_dtype == "fp16" else torch.float32,
            logprobs_mode=s.logprobs_mode,
        )
        if launch.remote:
            torch.distributed.barrier()  # ready only when every rank, local or not, has loaded
        if conn is not None:
            compute = describe(s.kernels) if device.kind == "cpu" else device.kind
            if kernels is not None:
                compute += f", {kernels.threads} thread{'s' * (kernels.threads > 1)}"
            ready = RankReady(
                rank, loaded.weight_bytes, runner.kv_cache_bytes, loaded.load_seconds, peak, compute,
                runner.kv_cache_resident_bytes(),
            )  # fmt: skip
            conn.send(ready)
    except Exception as e:  # report, then exit: the pool turns this into a clear start-up error
        # A ValueError (ModelLoadError, ShardingError, ...) already says file and problem in one line.
        if conn is not None:  # the pool reports it, once: the server's log has one line per failure
            conn.send(RankFailed(rank, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))
        else:
            log.error("rank %d failed to start: %s", rank, e)
        log.debug("%s", traceback.format_exc())
        return
    clean = _serve(rank, runner, conn, launch.remote, fault)
    comm.close()
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()
    logging.shutdown()
    # Leave without the interpreter's teardown: gloo's threads can abort it ("terminate called
    # without an active exception", exit 250) once the peers are gone, which would hide a clean stop.
    os._exit(0 if clean else 1)


@dataclass(frozen=True)
class RemoteRank:
    """What `shardserve rank` knows before joining the group; the rest comes from rank 0."""

    init_method: str
    world_size: int
    device: str = "auto"
    threads: int = 1
    model_path: Path | None = None  # this machine's copy of the model; default: the leader's path


def _broadcast(obj: object) -> object:
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _next_plan(rank: int, conn: Connection | None, remote: bool) -> StepPlan | None:
    plan = pickle.loads(conn.recv_bytes()) if conn is not None and (rank == 0 or not remote) else None
    return _broadcast(plan) if remote else plan


def _serve(
    rank: int, runner: ModelRunner, conn: Connection | None, remote: bool, fault: Fault | None
) -> bool:
    """Steps until told to stop (True) or until the pool or rank 0 vanished (False)."""
    while True:
        try:
            plan = _next_plan(rank, conn, remote)
        except (EOFError, RuntimeError):  # the pool (or, remote, rank 0) is gone
            return False
        if plan is None:
            return True
        try:
            if fault is not None:
                fault.maybe_fire(plan.step_id)
            masks = conn.recv_bytes if rank == 0 and conn is not None else None
            out = runner.execute(plan, masks)
        except Exception as e:
            if rank == 0 and conn is not None:
                conn.send_bytes(pickle.dumps(StepOutput(plan.step_id, (), error=f"{type(e).__name__}: {e}")))
            log.error("rank %d step %d failed:\n%s", rank, plan.step_id, traceback.format_exc())
            os._exit(1)  # peers may be blocked in a collective with us: the pool restarts all
        if rank == 0 and conn is not None:
            conn.send_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
