"""Tensor-parallel worker ranks: equivalence across TP sizes, rank death, restart, no leaks."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import transformers

from app.engine.types import SamplingParams, SeqChunk, SeqSampling, StepPlan
from app.settings import Settings
from app.worker.pool import RankFailure, WorkerPool
from tests.support.api_server import process_alive
from tests.support.forward import pool_greedy, small_pool
from tests.support.models import tiny_llama

SHAPE = dict(
    hidden=288, heads=9, kv_heads=3, intermediate=96, tie=False, init_std=0.1
)  # 9 q / 3 kv: uneven at TP=2
PROMPT = list(range(5, 29))
STEPS = 12


def _score(pool: WorkerPool, prompt: list[int], k: int = 3) -> list:
    """Prompt logprobs of prompt, computed in two chunks (seq 1; seq 0 is done with its blocks)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=k)
    half, table = len(prompt) // 2, tuple(range(4))
    chunks = (
        SeqChunk(1, tuple(prompt[:half]), 0, table, False, 0, prompt_logprob_rows=half),
        SeqChunk(1, tuple(prompt[half:]), half, table, True, 0, prompt_logprob_rows=len(prompt) - 1 - half),
    )
    new = (SeqSampling.of(1, params, 0, tuple(prompt), ()),)
    parts = [
        p
        for i, c in enumerate(chunks)
        for p in pool.execute(StepPlan(100 + i, (c,), new if i == 0 else ())).prompt_logprobs
    ]
    assert [p.first_pos for p in parts] == [1, half + 1]
    return [t for p in parts for t in p.tokens]


def _shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("shardserve-")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory, **SHAPE)


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' greedy tokens and per-step log-softmax (its incremental decode, like ours)."""
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        prompt_logits = hf(torch.tensor([PROMPT])).logits[0, :-1]
    logp = torch.log_softmax(torch.cat(out.logits), dim=-1)
    return out.sequences[0, len(PROMPT) :].tolist(), logp, torch.log_softmax(prompt_logits, dim=-1)


@pytest.fixture(scope="module")
def tp1(model_dir):
    pool = small_pool(model_dir, 1)
    pool.start()
    try:
        yield pool_greedy(pool, PROMPT, STEPS)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_tp_equals_tp1_and_transformers(model_dir, reference, tp1, tp):
    ref_tokens, ref_logp, ref_prompt = reference
    pool = small_pool(model_dir, tp)
    ready = pool.start()
    try:
        tokens, tops = pool_greedy(pool, PROMPT, STEPS)
        scored = _score(pool, PROMPT)  # prompt logprobs: every rank computes the LM head's rows
    finally:
        pool.shutdown()
    assert [t.token_id for t in scored] == PROMPT[1:]
    for t, row in zip(scored, ref_prompt, strict=True):
        assert abs(t.logprob - row[t.token_id].item()) <= 1e-4
        assert t.rank == int((row > row[t.token_id]).sum()) + 1
        assert [i for i, _ in t.top_logprobs] == row.topk(3).indices.tolist()
    assert tokens == ref_tokens == tp1[0]
    for step, (top, top1) in enumerate(zip(tops, tp1[1], strict=True)):
        assert [i for i, _ in top] == [i for i, _ in top1]
        for (i, lp), (_, lp1) in zip(top, top1, strict=True):
            assert abs(lp - lp1) <= 1e-5
            assert abs(lp - ref_logp[step, i].item()) <= 1e-4
    assert [r.rank for r in ready] == list(range(tp))


def test_tp2_arena_holds_about_half(model_dir):
    sizes = {}
    for tp in (1, 2):
        pool = small_pool(model_dir, tp, "int8")
        sizes[tp] = [r.weight_bytes for r in pool.start()]
        pool.shutdown()
    # 9 q heads split 6 + 3: rank 0 holds more than half of attention, rank 1 less; MLP and vocab
    # split evenly; only the norms (fp32, 2 per layer + the final one) and the per-row fp32 scales
    # of the row-parallel o_proj and down_proj (2 per layer) are replicated.
    replicated = (2 * 2 + 1) * SHAPE["hidden"] * 4 + 2 * 2 * SHAPE["hidden"] * 4
    alignment = 64 * 25 * 2  # at most 64 bytes of padding per buffer, 25 buffers per rank
    assert sum(sizes[2]) - sizes[1][0] <= replicated + alignment
    assert all(0.3 * sizes[1][0] < s < 0.7 * sizes[1][0] for s in sizes[2])


def test_killed_rank_is_noticed_and_restart_gives_identical_output(model_dir, tp1):
    before = _shm_segments()
    pool = small_pool(model_dir, 2)
    pool.start()
    try:
        victim = pool.procs[1].pid
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1"):
            pool_greedy(pool, PROMPT, STEPS)
        assert time.monotonic() - t0 <= 2.5  # death_timeout is 2 s
        old_pids = pool.pids()
        pool.shutdown()
        assert not any(process_alive(p) for p in old_pids)
        pool.start()
        assert pool_greedy(pool, PROMPT, STEPS)[0] == tp1[0]
    finally:
        pool.shutdown()
    assert _shm_segments() <= before


def test_idle_death_is_reported_by_check_alive(model_dir):
    pool = small_pool(model_dir, 1)
    pool.start()
    try:
        assert pool.check_alive() is None
        os.kill(pool.procs[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while pool.check_alive() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "rank 0 died" in (pool.check_alive() or "")
    finally:
        pool.shutdown()


def test_impossible_tp_size_is_a_clear_start_error(model_dir):
    pool = small_pool(model_dir, 10)
    with pytest.raises(RankFailure, match="exceeds the model's 9 attention heads; use a size from 1 to 9"):
        pool.start()
    assert pool.procs == []


def test_ranks_on_another_node_join_through_dist_init(model_dir, tp1):
    """Multi-node TP as remote pods run it: rank 1 is a separate `shardserve rank` process tree,
    joined through the same --dist-init rendezvous (over loopback); same greedy output as TP=1."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    remote = subprocess.Popen(
        [sys.executable, "-m", "app", "rank", "--dist-init", url, "--tp", "2", "--rank-offset", "1", "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    settings = Settings(tp=2, block_size=16, max_num_batched_tokens=64, dist_init=url, local_ranks=1)
    pool = WorkerPool(settings, model_dir, "fp32", num_blocks=8)
    try:
        ready = pool.start()
        assert [r.rank for r in ready] == [0]
        tokens, _ = pool_greedy(pool, PROMPT, STEPS)
    finally:
        pool.shutdown()
        try:
            code = remote.wait(timeout=30)
        finally:
            remote.kill()
    assert tokens == tp1[0]
    assert code == 0, remote.stderr.read()
