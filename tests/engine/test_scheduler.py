"""Scheduler: token budget, chunked prefill, admission, preemption, prefix sharing (no torch)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from app.engine.block_manager import BlockManager
from app.engine.scheduler import Scheduler, SchedulerConfig
from app.engine.sequence import SeqStatus, Sequence
from app.engine.types import SamplingParams, StepPlan

_ids = itertools.count()


def make_sched(num_blocks: int = 64, block_size: int = 4, **cfg: int | bool) -> Scheduler:
    limits = {"max_num_batched_tokens": 64, "max_num_seqs": 8, **cfg}
    config = SchedulerConfig(block_size=block_size, **limits)
    return Scheduler(config, BlockManager(num_blocks, block_size), eos_token_ids=(2,))


def make_seq(
    prompt,
    request_id: str | None = None,
    index: int = 0,
    arrival: float = 0.0,
    priority: int = 0,
    sampling: SamplingParams | None = None,
):
    sid = next(_ids)
    params = sampling or SamplingParams()
    return Sequence(sid, request_id or f"r{sid}", index, tuple(prompt), params, arrival, priority)


def step(sched: Scheduler, token: int = 7) -> StepPlan | None:
    """One engine step with a fake model: every sampling chunk yields `token`."""
    plan = sched.schedule()
    if plan is not None:
        seqs = {s.seq_id: s for s in sched.running}
        for chunk in plan.chunks:
            if chunk.sample:
                seqs[chunk.seq_id].append_token(token)
    return plan


def test_chunked_prefill_splits_long_prompt_contiguously():
    sched = make_sched(max_num_batched_tokens=32)
    seq = make_seq(range(100))
    sched.add(seq)
    chunks = [step(sched).chunks[0] for _ in range(4)]
    assert [len(c.token_ids) for c in chunks] == [32, 32, 32, 4]
    assert [c.start_pos for c in chunks] == [0, 32, 64, 96]
    assert [c.sample for c in chunks] == [False, False, False, True]
    assert sum((c.token_ids for c in chunks), ()) == tuple(range(100))
    for c in chunks:  # each chunk's table covers exactly the positions computed so far
        assert len(c.block_table) == -(-(c.start_pos + len(c.token_ids)) // 4)
    decode = step(sched).chunks[0]
    assert (decode.token_ids, decode.start_pos, decode.sample) == ((7,), 100, True)
    assert decode.num_output_tokens == 1


def test_decodes_keep_flowing_during_a_long_prefill():
    sched = make_sched(max_num_batched_tokens=16)
    short = make_seq(range(5))
    sched.add(short)
    step(sched)
    sched.add(make_seq(range(100, 160)))
    for _ in range(4):
        plan = step(sched)
        assert plan.num_tokens <= 16
        assert plan.chunks[0].seq_id == short.seq_id and plan.chunks[0].token_ids == (7,)
        assert len(plan.chunks) == 2  # and the long prompt takes the rest of the budget


def test_new_seqs_sent_once_and_finished_ids_follow():
    sched = make_sched()
    a = make_seq(range(6), sampling=SamplingParams(min_tokens=2, repetition_penalty=1.2))
    sched.add(a)
    plan = step(sched)
    assert [s.seq_id for s in plan.new_seqs] == [a.seq_id]
    assert plan.new_seqs[0].end_token_ids == (2,) and plan.new_seqs[0].prompt_token_ids == tuple(range(6))
    assert step(sched).new_seqs == ()
    sched.finish(a)
    assert a.status is SeqStatus.FINISHED and sched.block_manager.num_used_blocks == 0
    assert sched.schedule() is None
    b = make_seq(range(50, 53))
    sched.add(b)
    assert sched.schedule().finished_seq_ids == (a.seq_id,)


def test_admission_respects_seats_budget_and_priority():
    sched = make_sched(max_num_seqs=2, max_num_batched_tokens=8)
    late_urgent = make_seq(range(3), arrival=5.0, priority=-1)
    early = make_seq(range(3), arrival=1.0)
    later = make_seq(range(3), arrival=2.0)
    for s in (later, early, late_urgent):
        sched.add(s)
    plan = sched.schedule()
    assert [c.seq_id for c in plan.chunks] == [late_urgent.seq_id, early.seq_id]
    assert sched.num_running == 2 and sched.num_waiting == 1 and sched.num_queued_tokens == 3


def test_preemption_evicts_latest_admission_and_recomputes_it():
    # 6 blocks of 4 tokens: two sequences of 8-token prompts fill 4; decoding soon runs out.
    sched = make_sched(num_blocks=6, max_num_batched_tokens=16)
    first, second = make_seq(range(8)), make_seq(range(20, 28))
    sched.add(first)
    sched.add(second)
    step(sched)
    n_steps = 0
    while sched.preemptions_total == 0:
        plan = step(sched, token=100 + n_steps)
        n_steps += 1
        assert n_steps < 20
    assert second.status is SeqStatus.PREEMPTED and second.num_computed_tokens == 0
    assert second.block_table == [] and sched.waiting == [second]
    assert [c.seq_id for c in plan.chunks] == [first.seq_id]  # no admission in a preempting step
    outputs = list(second.output_token_ids)
    assert outputs  # it had generated before being preempted
    sched.finish(first)
    resumed = step(sched).chunks
    # Resume recomputes prompt + outputs; its prefix blocks may come back from the cache.
    start = resumed[0].start_pos
    assert start % 4 == 0 and start < 8 + len(outputs)
    assert resumed[0].token_ids == tuple([*range(20, 28), *outputs])[start:]
    assert resumed[0].sample and resumed[0].num_output_tokens == len(outputs)
    assert second.num_cached_tokens == 0  # usage.cached_tokens counts only the first admission


def test_prefix_hit_skips_cached_blocks_and_moves_counters():
    sched = make_sched()
    a = make_seq(range(10))
    sched.add(a)
    step(sched)
    sched.finish(a)
    b = make_seq([*range(8), 99, 98, 97])
    sched.add(b)
    chunk = step(sched).chunks[0]
    assert chunk.start_pos == 8 and chunk.token_ids == (99, 98, 97)
    assert b.num_cached_tokens == 8
    assert (sched.block_manager.prefix_queries, sched.block_manager.prefix_hits) == (21, 8)


def test_n_choices_share_the_prompts_full_blocks():
    sched = make_sched()
    prompt = range(10)
    c0, c1 = make_seq(prompt, "req", 0), make_seq(prompt, "req", 1)
    sched.add(c0)
    sched.add(c1)
    plan = sched.schedule()
    assert [(c.start_pos, len(c.token_ids)) for c in plan.chunks] == [(0, 10), (8, 2)]
    assert c0.block_table[:2] == c1.block_table[:2] and c0.block_table[2] != c1.block_table[2]
    assert [sched.block_manager.ref_count(b) for b in c0.block_table] == [2, 2, 1]
    assert {s.seq_id for s in sched.abort("req")} == {c0.seq_id, c1.seq_id}
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()


def test_abort_waiting_and_running():
    sched = make_sched(max_num_seqs=1)
    run, wait = make_seq(range(5), "run"), make_seq(range(5), "wait")
    sched.add(run)
    sched.add(wait)
    step(sched)
    assert sched.abort("wait") == [wait] and sched.num_waiting == 0
    assert sched.abort("run") == [run] and sched.num_running == 0
    assert sched.abort("run") == []
    assert sched.block_manager.num_used_blocks == 0


def test_unschedulable_prompt_does_not_block_the_queue():
    sched = make_sched(num_blocks=4, max_num_batched_tokens=64, max_model_len=64)
    huge, small = make_seq(range(40)), make_seq(range(6))  # 40 tokens need 10 blocks of 4; 4 exist
    sched.add(huge)
    sched.add(small)
    plan = sched.schedule()
    assert [c.seq_id for c in plan.chunks] == [small.seq_id]
    assert sched.drain_unschedulable() == [huge] and huge.status is SeqStatus.FINISHED
    assert sched.drain_unschedulable() == []


def test_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError):
        SchedulerConfig(chunked_prefill=False, max_num_batched_tokens=512, max_model_len=2048)
    with pytest.raises(ValueError):
        Scheduler(SchedulerConfig(block_size=16), BlockManager(8, 8))


def test_without_chunked_prefill_a_prompt_runs_whole_or_waits():
    sched = make_sched(max_num_batched_tokens=40, max_model_len=40, chunked_prefill=False)
    a, b = make_seq(range(30)), make_seq(range(100, 135))
    sched.add(a)
    sched.add(b)
    plan = step(sched)  # b's 35 tokens do not fit in the 10 left, and are not split
    assert [(c.seq_id, len(c.token_ids)) for c in plan.chunks] == [(a.seq_id, 30)]
    plan = step(sched)
    assert [len(c.token_ids) for c in plan.chunks] == [1, 35]


def test_long_prefill_threshold_caps_each_chunk():
    sched = make_sched(max_num_batched_tokens=64, long_prefill_threshold=10)
    a, b = make_seq(range(25)), make_seq(range(100, 125))
    sched.add(a)
    sched.add(b)
    assert [len(c.token_ids) for c in sched.schedule().chunks] == [10, 10]
    assert sched.num_queued_tokens == 30


# ---- property test: a fake engine drives random traffic; invariants checked after every rule ----

_TEMPLATES = [[(i * 7 + t) % 4 for i in range(40)] for t in range(3)]  # shared prefixes, tiny vocab


def _prefix_hashes(tokens: list[int]) -> list[int]:
    """What a slot's KV depends on: every token up to and including its position."""
    out, h = [], 0
    for tok in tokens:
        h = hash((h, tok))
        out.append(h)
    return out


class EngineMachine(RuleBasedStateMachine):
    @initialize(
        kv_tokens=st.integers(12, 96),
        block_size=st.sampled_from([1, 2, 4, 8]),
        budget=st.integers(1, 48),
        seats=st.integers(1, 8),
        chunked=st.booleans(),
        threshold=st.integers(0, 12),
        caching=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def setup(self, kv_tokens, block_size, budget, seats, chunked, threshold, caching, seed):
        self.max_len, num_blocks = 48, max(1, kv_tokens // block_size)
        if not chunked:
            budget, threshold = max(budget, self.max_len), 0
        self.cfg = SchedulerConfig(
            max_num_seqs=min(seats, budget),
            max_num_batched_tokens=budget,
            max_model_len=self.max_len,
            block_size=block_size,
            chunked_prefill=chunked,
            long_prefill_threshold=threshold,
        )
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.sched = Scheduler(self.cfg, self.bm, eos_token_ids=(0,))
        self.rng = random.Random(seed)
        self.live: dict[int, Sequence] = {}
        self.sent: set[int] = set()
        self.pending_finished: set[int] = set()
        self.kv: dict[tuple[int, int], int] = {}  # (block, slot) -> prefix hash of what was written

    def _retired(self, seq: Sequence) -> None:
        del self.live[seq.seq_id]
        if seq.seq_id in self.sent:
            self.pending_finished.add(seq.seq_id)

    @rule(
        template=st.integers(0, 2),
        keep=st.integers(0, 40),
        extra=st.integers(0, 10),
        n=st.integers(1, 3),
        max_tokens=st.integers(1, 12),
        priority=st.integers(0, 1),
    )
    def add(self, template, keep, extra, n, max_tokens, priority):
        prompt = _TEMPLATES[template][:keep] + [self.rng.randrange(4) for _ in range(extra)]
        prompt = prompt or [1]
        rid = f"r{next(_ids)}"
        for index in range(n):
            seq = Sequence(
                next(_ids),
                rid,
                index,
                tuple(prompt),
                SamplingParams(max_tokens=max_tokens),
                arrival_time=float(len(self.live)),
                priority=priority,
            )
            self.sched.add(seq)
            self.live[seq.seq_id] = seq

    @rule(times=st.integers(1, 4))
    def steps(self, times):
        for _ in range(times):
            self.step()

    def step(self):
        before = {s.seq_id: (s.status, s.num_computed_tokens, s.num_preemptions) for s in self.live.values()}
        preemptions = self.sched.preemptions_total
        plan = self.sched.schedule()
        for seq in self.sched.drain_unschedulable():
            blocks_needed = -(-seq.num_tokens // self.bm.block_size)
            assert seq.num_tokens > self.max_len or blocks_needed > self.bm.num_blocks
            self._retired(seq)
        if plan is None:
            assert not self.sched.has_unfinished()  # progress: anything unfinished gets scheduled
            return
        bs = self.cfg.block_size
        assert plan.num_tokens <= self.cfg.max_num_batched_tokens
        assert len(plan.chunks) <= self.cfg.max_num_seqs
        assert len({c.seq_id for c in plan.chunks}) == len(plan.chunks)
        assert set(plan.finished_seq_ids) == self.pending_finished
        self.pending_finished.clear()
        new_ids = [s.seq_id for s in plan.new_seqs]
        assert not self.sent.intersection(new_ids)
        self.sent.update(new_ids)
        holders: dict[int, list[Sequence]] = {}
        for seq in self.sched.running:
            for b in seq.block_table:
                holders.setdefault(b, []).append(seq)
        for chunk in plan.chunks:
            seq = self.live[chunk.seq_id]
            assert seq.status is SeqStatus.RUNNING and seq.seq_id in self.sent
            start, end = chunk.start_pos, chunk.start_pos + len(chunk.token_ids)
            status, computed, npre = before[seq.seq_id]
            if status is SeqStatus.RUNNING and seq.num_preemptions == npre:
                assert start == computed  # contiguous with its previous chunk
            else:
                assert self.sched.preemptions_total == preemptions  # no admission in a preempting step
                assert start % bs == 0 and start < seq.num_tokens  # a prefix hit, never the last token
            assert end == seq.num_computed_tokens and chunk.token_ids == seq.token_ids(start, end)
            assert chunk.sample == (end == seq.num_tokens)
            assert chunk.num_output_tokens == seq.num_output_tokens
            assert chunk.block_table == tuple(seq.block_table) and len(chunk.block_table) == -(-end // bs)
            if self.cfg.long_prefill_threshold:
                assert len(chunk.token_ids) <= self.cfg.long_prefill_threshold
            if not self.cfg.chunked_prefill:
                assert end == seq.num_tokens
            expect = _prefix_hashes(seq.all_token_ids)
            for pos in range(start):  # the cache holds exactly this sequence's prefix
                assert self.kv.get((chunk.block_table[pos // bs], pos % bs)) == expect[pos]
            for pos in range(start, end):
                block, slot = chunk.block_table[pos // bs], pos % bs
                for other in holders[block]:  # nobody relying on this slot sees it change
                    q = other.block_table.index(block) * bs + slot
                    if other is not seq and q < other.num_computed_tokens:
                        assert _prefix_hashes(other.all_token_ids)[q] == expect[pos]
                self.kv[(block, slot)] = expect[pos]
        for chunk in plan.chunks:
            seq = self.live[chunk.seq_id]
            if chunk.sample:
                seq.append_token(self.rng.randrange(4))
                if seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_len:
                    self.sched.finish(seq)
                    self._retired(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), whole_request=st.booleans())
    def end_early(self, data, whole_request):
        seq = data.draw(st.sampled_from(sorted(self.live.values(), key=lambda s: s.seq_id)))
        if whole_request:
            ended = self.sched.abort(seq.request_id)
            assert {s.seq_id for s in ended} == {
                s.seq_id for s in self.live.values() if s.request_id == seq.request_id
            }
        else:
            self.sched.finish(seq)
            ended = [seq]
        for s in ended:
            assert s.status is SeqStatus.FINISHED and s.block_table == []
            self._retired(s)

    @invariant()
    def blocks_and_queues_agree(self):
        bs, held = self.cfg.block_size, Counter()
        assert len(self.sched.running) <= self.cfg.max_num_seqs
        for seq in self.sched.running:
            assert seq.status is SeqStatus.RUNNING and seq.num_computed_tokens <= seq.num_tokens
            assert len(seq.block_table) == -(-seq.num_computed_tokens // bs)
            assert len(set(seq.block_table)) == len(seq.block_table)
            held.update(seq.block_table)
        for seq in self.sched.waiting:
            assert seq.status in (SeqStatus.WAITING, SeqStatus.PREEMPTED)
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        keys = [(s.priority, s.arrival_time, s.seq_id) for s in self.sched.waiting]
        assert keys == sorted(keys)
        assert {s.seq_id for s in [*self.sched.running, *self.sched.waiting]} == set(self.live)
        assert all(self.bm.ref_count(b) == held[b] for b in range(self.bm.num_blocks))
        free = self.bm.free_block_ids()
        assert free.isdisjoint(held) and len(free) + len(held) == self.bm.num_blocks
        assert self.bm.num_used_blocks == len(held)
        assert self.bm.prefix_hits <= self.bm.prefix_queries

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for rid in {s.request_id for s in self.live.values()}:
            self.sched.abort(rid)
        assert not self.sched.has_unfinished()
        assert self.bm.num_used_blocks == 0 and self.bm.num_free_blocks == self.bm.num_blocks
        assert all(self.bm.ref_count(b) == 0 for b in range(self.bm.num_blocks))


EngineMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_engine_machine = EngineMachine.TestCase
