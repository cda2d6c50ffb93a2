"""Fault injection for the robustness tests and drills: make a rank fail at a chosen step.

SHARDSERVE_FAULT="KIND@STEP[:RANK]" (rank 0 when omitted), read by each rank at start-up:
- raise: an exception inside the step (as a bug or a CUDA error would)
- hang:  the step never ends (as a deadlocked collective would); the pool's --step-timeout ends it
- exit:  the process dies at once, without a word (as the OOM killer would)

Step ids keep counting across pool restarts, so a fault fires once however often the pool
restarts. Unset, this costs one comparison per step."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "SHARDSERVE_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0

    @classmethod
    def from_env(cls, rank: int) -> Fault | None:
        spec = os.environ.get(ENV)
        if not spec:
            return None
        try:
            kind, _, where = spec.partition("@")
            step, _, on_rank = where.partition(":")
            fault = cls(kind, int(step), int(on_rank or 0))
        except ValueError:
            raise ValueError(f"{ENV}={spec!r}: expected KIND@STEP[:RANK]") from None
        if fault.kind not in ("raise", "hang", "exit"):
            raise ValueError(f"{ENV}={spec!r}: KIND is raise, hang or exit")
        return fault if fault.rank == rank else None

    def maybe_fire(self, step_id: int) -> None:
        if step_id != self.step:
            return
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step_id} ({ENV})")
        if self.kind == "exit":
            os._exit(137)
        while True:  # hang
            time.sleep(3600)
