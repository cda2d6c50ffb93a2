"""The pool of rank processes: spawn, hand each step's plan to every rank, read rank 0's answer,
and restart the ranks when they fail.

Channel: one duplex pipe per rank. The plan is pickled once and written to every pipe (a few
tens of µs for a batch of 64); only rank 0 answers. A dead rank is seen through its process
sentinel, both while a step is in flight and between steps (`check_alive`), so a failure is
noticed within --rank-death-timeout and the pool can be restarted from scratch (`restart`, with
back-off and at most --pool-max-restarts attempts per failure episode).

The ranks get the server's Settings whole (without its API keys, which no rank needs), plus what
the pool decided for this launch (RankLaunch): the one typed object, not fields copied by hand."""

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
from multiprocessing.connection import Connection, wait
from pathlib import Path

from app.engine.types import ExecutorFailure, StepOutput, StepPlan
from app.metrics import Metrics
from app.settings import Settings
from app.worker.comm import cleanup
from app.worker.worker import RankFailed, RankLaunch, RankReady, WorkerArgs, worker_main

log = logging.getLogger("shardserve.pool")

RESTART_WINDOW = 300.0  # seconds of good health after which a rank failure gets fresh restart attempts


class RankFailure(ExecutorFailure):
    """A rank died, hung past the step timeout, or raised; the pool must be restarted."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerPool:
    """The engine's Executor. Owned by the engine thread once started (execute, check_alive,
    mark_down and restart run there); `up` and `restarts` are read by /ready through the stack."""

    def __init__(
        self,
        settings: Settings,
        model_path: Path,
        dtype: str,
        num_blocks: int,
        *,
        metrics: Metrics | None = None,
        load_timeout: float = 600.0,
    ) -> None:
        """dtype: the resolved weight dtype (never "auto"); num_blocks: the KV cache, in blocks."""
        # the ranks need no API key; remote ranks receive these settings over the network
        self.settings = settings.model_copy(update={"api_key": [], "api_key_file": None})
        self.model_path, self.dtype, self.num_blocks = model_path, dtype, num_blocks
        self.metrics = metrics  # rank gauges and restarts
        self.load_timeout = load_timeout
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self.ready: list[RankReady] = []
        self.shm_name: str | None = None
        self.remote = False
        self.up = False  # every rank loaded and no failure seen since
        self.restarts = 0  # restart attempts in the current failure episode
        self._last_failure = float("-inf")

    def start(self) -> list[RankReady]:
        s = self.settings
        ctx = mp.get_context("spawn")
        n_local = s.tp if s.local_ranks is None else s.local_ranks
        self.remote = n_local < s.tp
        if self.remote and s.dist_init is None:
            raise RankFailure(f"{s.tp - n_local} rank(s) run elsewhere: --dist-init must name the rendezvous")
        self.shm_name = (
            f"shardserve-{os.getpid()}-{uuid.uuid4().hex[:8]}" if not self.remote and s.tp > 1 else None
        )
        args = WorkerArgs(
            s,
            RankLaunch(
                model_path=self.model_path,
                dtype=self.dtype,
                num_blocks=self.num_blocks,
                init_method=s.dist_init or f"tcp://127.0.0.1:{_free_port()}",
                shm_name=self.shm_name,
                threads=max(1, (os.cpu_count() or 1) // s.tp),
                remote=self.remote,
            ),
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
        self.up = True
        self._report()
        return self.ready

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_ranks(
                self.settings.tp, self.up, {r.rank: r.weight_bytes for r in self.ready}
            )

    def mark_down(self, reason: str) -> None:
        """The engine's first word of a failure, before it fails the requests in flight: from here
        on /ready answers 503, so a client that saw its request fail never sees a ready server."""
        self.up = False
        self._report()

    def restart(self, reason: str) -> bool:
        """After a failure: restart the ranks with back-off, at most --pool-max-restarts times per
        failure episode (failures further apart than RESTART_WINDOW start a new one). False: given
        up; the engine then fails every request and /health answers 503."""
        now = time.monotonic()
        if now - self._last_failure > RESTART_WINDOW:
            self.restarts = 0
        self._last_failure = now
        self.mark_down(reason)
        self.shutdown(timeout=2.0)
        while self.restarts < self.settings.pool_max_restarts:
            self.restarts += 1
            if self.metrics is not None:
                self.metrics.pool_restarts.inc()
            time.sleep(min(8.0, 0.5 * 2 ** (self.restarts - 1)))
            try:
                self.start()
            except RankFailure as e:
                log.error("pool restart %d failed: %s", self.restarts, e)
                continue
            log.warning("worker pool restarted after: %s", reason)
            return True
        return False

    def _await_ready(self, rank: int) -> RankReady:
        deadline = time.monotonic() + self.load_timeout
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
        step_timeout, death_timeout = self.settings.step_timeout, self.settings.rank_death_timeout
        deadline = time.monotonic() + step_timeout
        sentinels = [p.sentinel for p in self.procs]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankFailure(f"step {plan.step_id} exceeded the step timeout ({step_timeout}s)")
            ready = wait([self.conns[0], *sentinels], timeout=min(remaining, death_timeout))
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
