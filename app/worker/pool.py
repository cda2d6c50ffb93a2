"""The pool of rank processes: spawn, hand each step's plan to every rank, read rank 0's answer.

Channel: one duplex pipe per rank. The plan is pickled once and written to every pipe (a few
tens of µs for a batch of 64); only rank 0 answers. A dead rank is seen through its process
sentinel, both while a step is in flight and between steps (`check_alive`), so a failure is
noticed within `death_timeout` and the pool can be restarted from scratch."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from app.engine.engine import ExecutorFailure
from app.engine.types import StepOutput, StepPlan
from app.worker.comm import cleanup
from app.worker.worker import RankFailed, RankReady, WorkerArgs, worker_main

log = logging.getLogger("shardserve.pool")


class RankFailure(ExecutorFailure):
    """A rank died, hung past the step timeout, or raised; the pool must be restarted."""


@dataclass(frozen=True)
class PoolConfig:
    model_path: Path
    dtype: str
    tp: int
    num_blocks: int
    block_size: int
    max_num_batched_tokens: int
    device: str = "cpu"
    seed: int = 0
    dist_init: str | None = None  # tcp://host:port shared with ranks on other machines
    local_ranks: int | None = None  # ranks started here (0 .. local_ranks-1); the rest join remotely
    step_timeout: float = 60.0
    death_timeout: float = 2.0
    load_timeout: float = 600.0
    kernels: str = "auto"  # compute path of the ranks (app/kernels): auto, avx512, avx2, torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerPool:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self.ready: list[RankReady] = []
        self.shm_name: str | None = None
        self.remote = False

    def start(self) -> list[RankReady]:
        cfg = self.config
        ctx = mp.get_context("spawn")
        n_local = cfg.tp if cfg.local_ranks is None else cfg.local_ranks
        self.remote = n_local < cfg.tp
        if self.remote and cfg.dist_init is None:
            raise RankFailure(
                f"{cfg.tp - n_local} rank(s) run elsewhere: --dist-init must name the rendezvous"
            )
        self.shm_name = (
            f"shardserve-{os.getpid()}-{uuid.uuid4().hex[:8]}" if not self.remote and cfg.tp > 1 else None
        )
        args = WorkerArgs(
            model_path=cfg.model_path,
            dtype=cfg.dtype,
            device=cfg.device,
            world_size=cfg.tp,
            init_method=cfg.dist_init or f"tcp://127.0.0.1:{_free_port()}",
            shm_name=self.shm_name,
            num_blocks=cfg.num_blocks,
            block_size=cfg.block_size,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            threads=max(1, (os.cpu_count() or 1) // cfg.tp),
            seed=cfg.seed,
            comm_timeout=cfg.step_timeout,
            remote=self.remote,
            kernels=cfg.kernels,
        )
        # OpenMP threads that spin at barriers collapse when the cores are shared: measured 1.65 s
        # per fp32 decode step at load average 4.5 versus 0.16 s with passive waiting (0.09 s on one
        # thread). Ranks inherit the environment at spawn, and OpenMP reads it when torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        for rank in range(n_local):
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=worker_main, args=(rank, args, child), daemon=True, name=f"rank{rank}")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        try:
            self.ready = [self._await_ready(r) for r in range(n_local)]
        except RankFailure:
            self.shutdown()
            raise
        return self.ready

    def _await_ready(self, rank: int) -> RankReady:
        deadline = time.monotonic() + self.config.load_timeout
        conn, proc = self.conns[rank], self.procs[rank]
        while time.monotonic() < deadline:
            if conn.poll(0.2):
                try:
                    msg = conn.recv()
                except EOFError:
                    break
                if isinstance(msg, RankFailed):
                    raise RankFailure(f"rank {msg.rank} failed to start: {msg.error}")
                return msg
            if not proc.is_alive() or self.check_alive():
                break
        raise RankFailure(f"rank {rank} exited or timed out while loading the model")

    def execute(self, plan: StepPlan, masks: Callable[[], bytes] | None = None) -> StepOutput:
        data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns[:1] if self.remote else self.conns:  # remote: rank 0 broadcasts
                conn.send_bytes(data)
            if plan.masked_seq_ids:
                assert masks is not None, "a plan with masked sequences needs their masks"
                self.conns[0].send_bytes(masks())  # computed while the ranks run the forward
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            raise RankFailure(f"a rank is gone ({e})") from None
        deadline = time.monotonic() + self.config.step_timeout
        sentinels = [p.sentinel for p in self.procs]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankFailure(
                    f"step {plan.step_id} exceeded the step timeout ({self.config.step_timeout}s)"
                )
            ready = wait([self.conns[0], *sentinels], timeout=min(remaining, self.config.death_timeout))
            if self.conns[0] in ready:
                try:
                    out: StepOutput = pickle.loads(self.conns[0].recv_bytes())
                except EOFError:
                    raise RankFailure("rank 0 died mid-step") from None
                if out.error:
                    raise RankFailure(f"rank 0 failed in step {plan.step_id}: {out.error}")
                return out
            dead = self.check_alive()
            if dead:
                raise RankFailure(dead)

    def check_alive(self) -> str | None:
        """None while every rank lives, else which one died and how."""
        for rank, proc in enumerate(self.procs):
            if proc.exitcode is not None:
                return f"rank {rank} died (exit code {proc.exitcode})"
        return None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every rank (politely, then by force) and release the shared memory."""
        for conn in self.conns[:1] if self.remote else self.conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(pickle.dumps(None))
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for conn in self.conns:
            conn.close()
        if self.shm_name is not None:
            cleanup(self.shm_name)
        self.procs, self.conns, self.ready = [], [], []
