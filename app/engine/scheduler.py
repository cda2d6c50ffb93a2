"""Continuous batching under a token budget, vLLM v1 style: no prefill and decode phases.

Each step every scheduled sequence's num_computed_tokens catches up with its num_tokens by as much
as the budget allows: running sequences first (decodes, 1 token each, then running prefills, which
get the next chunk of their prompt), then waiting sequences by (priority, arrival) while seats,
budget and blocks allow. num_computed_tokens is advanced here, when a chunk is planned, so the
engine's output loop only appends sampled tokens and calls finish(). The scheduler runs only
between steps, so freeing blocks (finish, abort, preemption) never races a forward.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from app.engine.block_manager import BlockManager
from app.engine.sequence import SeqStatus, Sequence
from app.engine.types import EngineStats, SeqChunk, SeqSampling, StepPlan


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # seats: sequences holding KV blocks and scheduled together
    max_num_batched_tokens: int = 512  # the token budget of one step (prefill chunks + decodes)
    max_model_len: int = 2048  # a sequence longer than this is never scheduled
    block_size: int = 16
    chunked_prefill: bool = True  # off: a prompt runs in one step or waits for a big enough budget
    long_prefill_threshold: int = 0  # > 0: cap one sequence's prefill chunk so others get budget too

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len, self.block_size) < 1:
            raise ValueError(f"scheduler limits must be positive: {self}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens < max_num_seqs: some decodes could never run")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill max_num_batched_tokens must be >= max_model_len")
        if self.long_prefill_threshold < 0 or (self.long_prefill_threshold and not self.chunked_prefill):
            raise ValueError("long_prefill_threshold needs chunked_prefill and must be >= 0")


def _queue_key(seq: Sequence) -> tuple[int, float, int]:
    # A preempted sequence keeps its key, so it goes back ahead of every later arrival of its
    # priority: FCFS admission means everything still waiting there arrived after it.
    return (seq.priority, seq.arrival_time, seq.seq_id)


class Scheduler:
    """Owns the waiting and running queues; only the engine thread calls it, between steps."""

    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: tuple[int, ...] = ()
    ) -> None:
        if config.block_size != block_manager.block_size:
            raise ValueError(f"block size {config.block_size} != block manager's {block_manager.block_size}")
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = tuple(eos_token_ids)
        self.waiting: list[Sequence] = []  # sorted by _queue_key
        self.running: list[Sequence] = []  # in admission order: the last is the next to preempt
        self._by_request: dict[str, list[Sequence]] = {}
        self._finished_ids: list[int] = []  # for the next plan's finished_seq_ids
        self._unschedulable: list[Sequence] = []
        self._next_step_id = 0
        self.preemptions_total = 0

    # ---- queue changes from the engine ----------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.status is not SeqStatus.WAITING or seq.block_table:
            raise ValueError(f"seq {seq.seq_id} is {seq.status.value}, not a fresh waiting sequence")
        bisect.insort(self.waiting, seq, key=_queue_key)
        self._by_request.setdefault(seq.request_id, []).append(seq)

    def finish(self, seq: Sequence) -> None:
        """End a sequence (stop, length, timeout, error): free its blocks now; rank 0 is told to drop
        its sampling state in the next plan. Idempotent."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._retire(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished choice of a request; returns them (the engine reports ABORT)."""
        seqs = [s for s in self._by_request.get(request_id, []) if not s.is_finished]
        for seq in seqs:
            self.finish(seq)
        return seqs

    def drain_unschedulable(self) -> list[Sequence]:
        """Sequences dropped (already FINISHED and freed) because they can never fit: longer than
        max_model_len or than the whole KV cache. The engine must end their requests."""
        out, self._unschedulable = self._unschedulable, []
        return out

    def _retire(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED
        if seq.sent_to_ranks:
            self._finished_ids.append(seq.seq_id)
        siblings = self._by_request.get(seq.request_id)
        if siblings is not None:
            siblings.remove(seq)
            if not siblings:
                del self._by_request[seq.request_id]

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Plan the next step, or None when there is nothing to compute."""
        budget = self.config.max_num_batched_tokens
        chunks: list[SeqChunk] = []
        new_seqs: list[SeqSampling] = []
        scheduled: set[int] = set()
        preempted = False

        # Decodes first so a long prefill never stalls them; then running prefills in admission order.
        order = [s for s in self.running if s.is_decoding] + [s for s in self.running if not s.is_decoding]
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = self._chunk_len(seq.num_uncomputed_tokens, budget)
            if n == 0:
                continue
            if self._never_fits(seq):
                self.running.remove(seq)
                self._drop(seq)
                continue
            while not self.block_manager.can_append(seq, n):
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.block_manager.append_slots(seq, n)
            chunks.append(self._plan_chunk(seq, n, new_seqs))
            scheduled.add(seq.seq_id)
            budget -= n

        # No admissions in a step that had to preempt: the freed blocks are for the running ones.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._never_fits(seq):
                self.waiting.pop(0)
                self._drop(seq)
                continue
            # a prompt to be scored is computed whole: cached blocks would skip the logits it needs
            hits = [] if seq.needs_prompt_logprobs else self.block_manager.lookup(seq)
            n = self._chunk_len(seq.num_tokens - len(hits) * self.config.block_size, budget)
            if n == 0 or not self.block_manager.can_allocate(seq, hits, n):
                break  # strict FCFS: nobody overtakes the head of the queue
            self.waiting.pop(0)
            first_time = seq.num_preemptions == 0
            cached = self.block_manager.allocate(seq, hits, n, count_query=first_time)
            if first_time:
                seq.num_cached_tokens = cached
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            chunks.append(self._plan_chunk(seq, n, new_seqs))
            budget -= n

        if not chunks:
            return None
        plan = StepPlan(
            step_id=self._next_step_id,
            chunks=tuple(chunks),
            new_seqs=tuple(new_seqs),
            finished_seq_ids=tuple(self._finished_ids),
        )
        self._next_step_id += 1
        self._finished_ids = []
        return plan

    def _chunk_len(self, remaining: int, budget: int) -> int:
        n = min(remaining, budget)
        if self.config.long_prefill_threshold:
            n = min(n, self.config.long_prefill_threshold)
        if not self.config.chunked_prefill and n < remaining:
            return 0
        return n

    def _never_fits(self, seq: Sequence) -> bool:
        bs = self.config.block_size
        too_many_blocks = -(-seq.num_tokens // bs) > self.block_manager.num_blocks
        return seq.num_tokens > self.config.max_model_len or too_many_blocks

    def _drop(self, seq: Sequence) -> None:
        self._retire(seq)
        self._unschedulable.append(seq)

    def _plan_chunk(self, seq: Sequence, n: int, new_seqs: list[SeqSampling]) -> SeqChunk:
        start = seq.num_computed_tokens
        seq.num_computed_tokens = start + n
        if not seq.sent_to_ranks:
            new_seqs.append(
                SeqSampling.of(seq.seq_id, seq.sampling, seq.index, seq.prompt_token_ids, self.eos_token_ids)
            )
            seq.sent_to_ranks = True
        return SeqChunk(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids(start, start + n),
            start_pos=start,
            block_table=tuple(seq.block_table),
            sample=seq.num_computed_tokens == seq.num_tokens,
            num_output_tokens=seq.num_output_tokens,
            prompt_logprob_rows=seq.prompt_logprob_rows(start, n),
        )

    def _preempt(self, seq: Sequence) -> None:
        # Recompute, not swap: its KV is dropped and its prompt + outputs so far are prefilled again
        # on resume (rank 0 keeps its sampling state, so the seeded stream continues unchanged).
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SeqStatus.PREEMPTED
        seq.num_preemptions += 1
        self.preemptions_total += 1
        bisect.insort(self.waiting, seq, key=_queue_key)

    # ---- stats ----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_queued_tokens(self) -> int:
        """Tokens still to prefill (prompt, or prompt + outputs after a preemption)."""
        waiting = sum(s.num_uncomputed_tokens for s in self.waiting)
        return waiting + sum(s.num_uncomputed_tokens for s in self.running if not s.is_decoding)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            running=self.num_running,
            waiting=self.num_waiting,
            queued_tokens=self.num_queued_tokens,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_cached=bm.num_cached_free_blocks,
            kv_cache_usage_ratio=bm.usage_ratio,
            preemptions_total=self.preemptions_total,
            prefix_cache_queries_total=bm.prefix_queries,
            prefix_cache_hits_total=bm.prefix_hits,
        )
