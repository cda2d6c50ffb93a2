"""The engine end to end over real rank processes: batching invariance, chunked prefill, preemption,
prefix caching, seeds, n > 1, abort and unschedulable prompts.

References: transformers' greedy output (fp32), and the same request run alone on a fresh engine.
"Alone" is compared bitwise, logprobs included: the step is batch-invariant by construction, so any
difference is a bug, not rounding. One worker pool per model and dtype for the whole module (starting
ranks costs seconds); each test builds fresh Engines over it, driven synchronously with run_once().
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from app.engine.client import EngineClient, OutputRouter
from app.engine.engine import Engine, EngineHooks
from app.engine.scheduler import SchedulerConfig
from app.engine.types import FinishReason, GenerateRequest, RequestOutput, SamplingParams, StepStats
from app.kernels import available_isas
from app.settings import Settings
from app.stack import Stack, build_stack
from app.tokenizer.detokenizer import IncrementalDetokenizer
from tests.support.models import tiny_llama

BLOCK = 16
POOL_KV_TOKENS = 8192  # the ranks' cache; engines use any number of blocks up to this
# Sentences from the tiny tokenizer's training corpus, so prompts are a few real tokens each.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def forward(self, x):\n    return self.norm(x + self.attn(x))\n",
    "Count with me: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024",
    "Once upon a time there was a little model that could only say a few words, but it said them well.",
    "Café, naïve, résumé, über, señor, façade. 日本語のテキスト。",
]


# ---- a synchronous driver ------------------------------------------------------------------


@dataclass
class Choice:
    """Everything one choice produced, concatenated from its RequestOutputs."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[tuple[int, float, tuple]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    outputs: list[RequestOutput] = field(default_factory=list)


class Harness:
    """A fresh Engine (empty scheduler, block manager and prefix cache) over a stack's ranks,
    stepped synchronously; its outputs and step stats are collected by the engine's hooks.

    kv_cache_tokens below the ranks' cache makes the engine use only that many blocks, as the
    setting of the same name does. Seq ids restart at 0 in every engine, which rank 0's sampler
    handles: a new sequence's SeqSampling replaces any state kept under its id."""

    def __init__(
        self,
        rt: Stack,
        kv_cache_tokens: int | None = None,
        prefix_caching: bool = True,
        hooks: EngineHooks | None = None,
        **sched,
    ):
        limits = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": rt.max_model_len, **sched}
        num_blocks = (kv_cache_tokens or POOL_KV_TOKENS) // BLOCK
        assert num_blocks <= rt.num_blocks
        self.outputs: list[RequestOutput] = []
        self.steps: list[StepStats] = []
        self.engine = Engine(
            executor=rt.pool,
            config=SchedulerConfig(block_size=BLOCK, **limits),
            num_blocks=num_blocks,
            tokenizer=rt.tokenizer,
            detokenizer_factory=IncrementalDetokenizer,
            hooks=hooks or EngineHooks(on_outputs=self.outputs.extend, on_step=self.steps.append),
            enable_prefix_caching=prefix_caching,
        )
        self.scheduler, self.block_manager = self.engine.scheduler, self.engine.block_manager

    def step(self) -> list[RequestOutput]:
        """One run_once(); the outputs it produced."""
        self.outputs.clear()
        self.engine.run_once()
        return list(self.outputs)

    def run(self, arrivals: dict[int, list[GenerateRequest]], max_steps: int = 2000) -> dict:
        """Submit arrivals[k] just before step k, step until everything finished; {(id, index): Choice}.

        Afterwards every KV block must be free again (cached prefixes count as free)."""
        expected = sum(r.sampling.n for reqs in arrivals.values() for r in reqs)
        choices: dict[tuple[str, int], Choice] = {}
        finished = 0
        for step in range(max_steps):
            for req in arrivals.get(step, []):
                self.engine.add_request(req)
            for out in self.step():
                c = choices.setdefault((out.request_id, out.index), Choice())
                assert c.finish_reason is None, f"output after the end of {out.request_id}/{out.index}"
                c.outputs.append(out)
                c.token_ids.extend(out.token_ids)
                c.text += out.text
                c.logprobs.extend((lp.token_id, lp.logprob, lp.top) for lp in out.logprobs)
                c.finish_reason = out.finish_reason
                finished += out.finish_reason is not None
            if finished == expected and step >= max(arrivals, default=0):
                break
        else:
            raise AssertionError(f"not finished after {max_steps} steps")
        assert not self.scheduler.has_unfinished()
        bm = self.block_manager
        assert bm.num_used_blocks == 0 and bm.free_block_ids() == set(range(bm.num_blocks))
        return choices


_rid = iter(range(10**9))


def request(
    ids, max_tokens: int = 24, n: int = 1, rid: str | None = None, **sampling: Any
) -> GenerateRequest:
    params = {"temperature": 0.0, "ignore_eos": True, "logprobs": 2, **sampling}
    return GenerateRequest(
        rid or f"req{next(_rid)}", tuple(ids), SamplingParams(max_tokens=max_tokens, n=n, **params),
        time.monotonic(),
    )  # fmt: skip


def alone(rt: Stack, req: GenerateRequest, **engine_kw: Any) -> Choice:
    return Harness(rt, **engine_kw).run({0: [req]})[(req.request_id, 0)]


def assert_same(a: Choice, b: Choice) -> None:
    assert a.token_ids == b.token_ids
    assert a.logprobs == b.logprobs  # bitwise: the same floats, not close ones
    assert a.text == b.text and a.finish_reason == b.finish_reason


# ---- fixtures --------------------------------------------------------------------------------


def _runtime(model: Path, dtype: str, kv_tokens: int = POOL_KV_TOKENS, **kw):
    settings = Settings(
        model=str(model), dtype=dtype, kv_cache_tokens=kv_tokens, block_size=BLOCK, max_num_batched_tokens=512,
        **kw,
    )  # fmt: skip
    rt = build_stack(settings, on_outputs=lambda outs: None)
    rt.pool.start()  # the stack's own engine thread is never started: tests drive fresh engines
    try:
        yield rt
    finally:
        rt.pool.shutdown()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory)


# Every dtype through the whole engine: fp32 and int8 on the best compute path here, the 16-bit
# dtypes on the AVX2 build of the kernels (forced, as on a CPU without AVX-512) where it differs.
ENGINE_PATHS = [
    ("fp32", "auto"),
    ("int8", "auto"),
    *((d, "avx2") for d in ("bf16", "fp16") if "avx2" in available_isas()),
]


@pytest.fixture(scope="module", params=ENGINE_PATHS, ids=lambda p: f"{p[0]}-{p[1]}")
def tiny(request, tiny_dir):
    dtype, kernels = request.param
    yield from _runtime(tiny_dir, dtype, kernels=kernels)


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir):
    return transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def prompts(rt: Stack) -> list[list[int]]:
    """Mixed lengths, from 1 token to several blocks."""
    ids = [rt.tokenizer.encode(t) for t in TEXTS]
    return [ids[0][:1], ids[1], ids[2] + ids[3], ids[4], ids[3][:5], ids[4] + ids[5] + ids[1]]


# ---- batching invariance ---------------------------------------------------------------------


def test_batched_equals_alone_and_transformers(tiny, tiny_hf):
    ps = prompts(tiny)
    assert len({len(p) for p in ps}) == len(ps) and max(len(p) for p in ps) > 3 * BLOCK
    reqs = [request(p, max_tokens=20 + i) for i, p in enumerate(ps)]
    # arrivals at different steps, with a token budget that chunks the long prompts mid-flight
    batched = Harness(tiny).run({0: reqs[:2], 3: reqs[2:4], 7: reqs[4:]})
    for req in reqs:
        got = batched[(req.request_id, 0)]
        assert got.finish_reason is FinishReason.LENGTH and len(got.token_ids) == req.sampling.max_tokens
        assert_same(got, alone(tiny, req))
        if tiny.dtype == "fp32":
            ids = torch.tensor([req.prompt_token_ids])
            with torch.no_grad():
                ref = tiny_hf.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                    max_new_tokens=req.sampling.max_tokens,
                )[0, ids.shape[1] :]  # fmt: skip
            assert got.token_ids == ref.tolist()


def test_chunked_prefill_equals_whole_prefill(tiny):
    long = prompts(tiny)[5]
    assert len(long) > 6 * BLOCK
    req = request(long, max_tokens=16)
    whole = Harness(tiny, max_num_batched_tokens=512)
    expected = whole.run({0: [req]})[(req.request_id, 0)]
    assert len(whole.steps) == 16  # one prefill step, then decodes
    for budget, threshold in ((16, 0), (64, 24)):  # chunks of 16, and of 24 that straddle blocks
        h = Harness(tiny, max_num_seqs=4, max_num_batched_tokens=budget, long_prefill_threshold=threshold)
        assert_same(h.run({0: [req]})[(req.request_id, 0)], expected)
        assert len(h.steps) >= 15 + len(long) / (threshold or budget)


def test_preemption_resumes_with_identical_tokens(tiny):
    ps = prompts(tiny)
    reqs = [request(p, max_tokens=40) for p in (ps[1], ps[3], ps[4])]
    reqs.append(request(ps[2], max_tokens=40, temperature=1.0, seed=11))  # a seeded stream resumes too
    # 8 blocks of 16 tokens: each request grows to 2-5 blocks, so they cannot all run together
    h = Harness(tiny, kv_cache_tokens=8 * BLOCK)
    got = h.run({0: reqs[:2], 2: reqs[2:]})
    assert (
        h.scheduler.preemptions_total > 0 and h.steps[-1].preemptions_total == h.scheduler.preemptions_total
    )
    for req in reqs:
        assert_same(got[(req.request_id, 0)], alone(tiny, req))


def test_prefix_cache_hit_equals_miss(tiny):
    ps = prompts(tiny)
    shared = ps[5] + ps[3]  # several full blocks
    cached = len(shared) // BLOCK * BLOCK
    first, second = request(shared + ps[1][:7]), request(shared + ps[4][:9])
    h = Harness(tiny)
    h.run({0: [first]})
    bm = h.block_manager
    hits_before, queries_before = bm.prefix_hits, bm.prefix_queries
    hit = h.run({0: [second]})[(second.request_id, 0)]
    assert bm.prefix_hits - hits_before == cached
    assert bm.prefix_queries - queries_before == len(second.prompt_token_ids)
    assert hit.outputs[-1].cached_tokens == cached
    miss = alone(tiny, second, prefix_caching=False)
    assert miss.outputs[-1].cached_tokens == 0
    assert_same(hit, miss)
    # the same prompt again: every full block but the one holding the last token is a hit
    again = h.run({0: [request(second.prompt_token_ids, rid="again")]})[("again", 0)]
    assert again.outputs[-1].cached_tokens == (len(second.prompt_token_ids) - 1) // BLOCK * BLOCK
    assert again.token_ids == hit.token_ids and again.logprobs == hit.logprobs


def scored_prompt(c: Choice) -> list[tuple]:
    (first,) = [o for o in c.outputs if o.prompt_logprobs is not None]
    return [(lp.token_id, lp.logprob, lp.rank, lp.top) for lp in first.prompt_logprobs]


def test_prompt_logprobs_ignore_batch_chunks_cache_and_preemption(tiny, tiny_hf):
    """Every prompt token is scored (a cached prefix is computed again), the same whatever the
    batch, the chunking, a preemption mid-prefill or the rank count; max_tokens 0 scores only."""
    ps = prompts(tiny)
    long, other = ps[2], ps[1]  # 6 and 3 blocks
    scored = request(long, max_tokens=4, prompt_logprobs=2)
    expected = alone(tiny, scored, max_num_batched_tokens=512)
    got = scored_prompt(expected)
    assert [t for t, *_ in got] == list(long[1:]) and all(len(top) == 2 for *_, top in got)
    if tiny.dtype == "fp32":
        with torch.no_grad():
            ref = torch.log_softmax(tiny_hf(torch.tensor([long])).logits[0, :-1], dim=-1)
        want = ref.gather(1, torch.tensor(long[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor([lp for _, lp, *_ in got]), want, atol=1e-4)
        assert [r for _, _, r, _ in got] == [
            int((row > row[t]).sum()) + 1 for row, t in zip(ref, long[1:], strict=True)
        ]
    # 8 blocks, chunks of 16: the long prompt is preempted mid-prefill while a decoding neighbour grows,
    # after its prefix was cached by an earlier request
    h = Harness(tiny, kv_cache_tokens=8 * BLOCK, max_num_batched_tokens=16)
    h.run({0: [request(long, max_tokens=1)]})
    neighbour = request(other, max_tokens=60)
    again = request(long, max_tokens=4, prompt_logprobs=2)
    only = request(long, max_tokens=0, prompt_logprobs=2)
    run = h.run({0: [neighbour], 1: [again], 30: [only]})
    assert h.scheduler.preemptions_total > 0
    for req in (again, only):
        c = run[(req.request_id, 0)]
        assert scored_prompt(c) == got and c.outputs[-1].cached_tokens == 0
    assert_same(run[(again.request_id, 0)], expected)
    assert (
        run[(only.request_id, 0)].token_ids == []
        and run[(only.request_id, 0)].finish_reason is FinishReason.LENGTH
    )


def test_seeded_sampling_ignores_batch_neighbours(tiny):
    ps = prompts(tiny)
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 50}
    target = request(ps[1], max_tokens=24, seed=1234, **sampled)
    solo = alone(tiny, target)
    assert alone(tiny, target).token_ids == solo.token_ids  # across runs
    neighbours = [
        request(ps[2], seed=7, **sampled), request(ps[4], temperature=1.3),
        request(ps[5], seed=99, temperature=0.5, min_p=0.1), request(ps[3]),
    ]  # fmt: skip
    got = Harness(tiny).run({0: neighbours[:2], 2: [target], 5: neighbours[2:]})
    assert_same(got[(target.request_id, 0)], solo)
    other_seed = alone(tiny, request(ps[1], max_tokens=24, seed=4321, **sampled))
    assert other_seed.token_ids != solo.token_ids


def test_n_choices_are_independent_reproducible_and_share_the_prompt(tiny):
    prompt = prompts(tiny)[5]
    params = {"max_tokens": 16, "n": 3, "seed": 5, "temperature": 1.0}
    req = request(prompt, **params)
    h = Harness(tiny)
    got = h.run({0: [req]})
    choices = [got[(req.request_id, i)].token_ids for i in range(3)]
    assert len({tuple(c) for c in choices}) == 3  # sampled independently, not copies
    full = len(prompt) // BLOCK * BLOCK
    assert h.block_manager.prefix_hits == 2 * full  # choices 1 and 2 reuse choice 0's prompt blocks
    for i in range(3):
        out = got[(req.request_id, i)].outputs[-1]
        assert (out.prompt_tokens, out.completion_tokens) == (len(prompt), 16)
    again = Harness(tiny).run({0: [request(prompt, rid="again", **params)]})
    assert [again[("again", i)].token_ids for i in range(3)] == choices
    # choice 0 is the same request with n = 1 (choice i draws from seed + i)
    assert alone(tiny, request(prompt, **{**params, "n": 1})).token_ids == choices[0]


def test_abort_frees_blocks_at_the_next_step(tiny):
    ps = prompts(tiny)
    h = Harness(tiny, max_num_seqs=1, max_num_batched_tokens=32)
    running, waiting = request(ps[1], max_tokens=100), request(ps[2], max_tokens=100)
    h.engine.add_request(running)
    h.engine.add_request(waiting)
    for _ in range(4):
        h.step()
    assert h.scheduler.running[0].is_decoding and h.scheduler.num_waiting == 1
    assert h.block_manager.num_used_blocks > 0
    h.engine.abort(running.request_id)
    h.engine.abort(waiting.request_id)
    ends = [o for o in h.step() if o.finish_reason is not None]
    assert h.block_manager.num_used_blocks == 0 and not h.scheduler.has_unfinished()
    assert sorted(o.request_id for o in ends) == sorted([running.request_id, waiting.request_id])
    assert all(o.finish_reason is FinishReason.ABORT for o in ends)
    # the engine goes on serving; the aborted sequences' sampling state is dropped on rank 0
    after = h.run({0: [request(ps[3], max_tokens=8)]})
    assert [c.finish_reason for c in after.values()] == [FinishReason.LENGTH]


def test_unschedulable_sequences_end_at_once_and_only_a_full_context_says_length(tiny):
    """A prompt past the context ends with `length`; one that outgrows a KV cache smaller than the
    context (the stack refuses such a cache; a directly driven engine can have one) fails saying
    so, never a `length` its max_tokens did not cause."""
    ps = prompts(tiny)
    h = Harness(tiny, kv_cache_tokens=4 * BLOCK, max_model_len=80)
    too_long = request(list(range(3, 90)), max_tokens=4)  # past max_model_len
    too_big = request((ps[5] * 3)[:60], max_tokens=19)  # fits the context, not the 4-block cache once grown
    fine = request(ps[1], max_tokens=4)
    h.engine.add_request(too_long)
    assert [(o.request_id, o.finish_reason) for o in h.step()] == [(too_long.request_id, FinishReason.LENGTH)]
    got = h.run({0: [too_big, fine]})
    assert got[(fine.request_id, 0)].finish_reason is FinishReason.LENGTH
    assert len(got[(fine.request_id, 0)].token_ids) == 4
    big = got[(too_big.request_id, 0)]
    assert big.finish_reason is FinishReason.ERROR and 0 < len(big.token_ids) < 19
    error = big.outputs[-1].error or ""
    assert "outgrew the KV cache of 64 tokens" in error and "context of 80" in error


def test_deadline_ends_a_request_with_timeout_and_frees_it(tiny):
    req = request(prompts(tiny)[1], max_tokens=50)
    late = GenerateRequest(
        "late", req.prompt_token_ids, req.sampling, time.monotonic(), deadline=time.monotonic()
    )
    got = Harness(tiny).run({0: [req, late]})
    assert got[("late", 0)].finish_reason is FinishReason.TIMEOUT and got[("late", 0)].token_ids == []
    assert got[(req.request_id, 0)].finish_reason is FinishReason.LENGTH


def test_engine_thread_behind_the_async_client(tiny):
    """The real loop thread and EngineClient.generate(): same tokens as the synchronous driver;
    leaving generate() early aborts; an unschedulable prompt ends at once rather than hanging."""
    ps = prompts(tiny)
    reqs = [request(ps[i], max_tokens=12) for i in (1, 2, 3)]
    expected = {r.request_id: alone(tiny, r).token_ids for r in reqs}

    async def main() -> None:
        router = OutputRouter(asyncio.get_running_loop())
        engine = Harness(tiny, max_model_len=128, hooks=EngineHooks(on_outputs=router.deliver)).engine
        client = EngineClient(engine, router)
        engine.start()
        try:

            async def tokens(req: GenerateRequest) -> list[int]:
                return [t async for out in client.generate(req) for t in out.token_ids]

            got = await asyncio.wait_for(asyncio.gather(*(tokens(r) for r in reqs)), 60)
            assert dict(zip(expected, got, strict=True)) == expected
            t0 = time.monotonic()
            too_long = request(range(3, 200), max_tokens=4)
            outs = await asyncio.wait_for(_collect(client.generate(too_long)), 10)
            assert [o.finish_reason for o in outs] == [FinishReason.LENGTH]
            assert time.monotonic() - t0 < engine.idle_poll  # not only when the idle loop wakes up
            stream = client.generate(request(ps[1], max_tokens=80))
            await anext(stream)
            assert engine.block_manager.num_used_blocks > 0
            await stream.aclose()  # the client went away
            for _ in range(200):
                if engine.block_manager.num_used_blocks == 0:
                    break
                await asyncio.sleep(0.05)
            assert engine.block_manager.num_used_blocks == 0 and client.num_in_flight == 0
        finally:
            engine.stop()

    asyncio.run(main())


async def _collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]


# ---- the default model -------------------------------------------------------------------------

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.\n",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to "
    "synthesize foods from carbon dioxide and water. In plants, it generally involves",
]


@pytest.fixture(scope="module", params=["int8", "fp32"])
def default_rt(request, default_model_path):
    yield from _runtime(default_model_path, request.param, kv_tokens=4096, max_model_len=4096)


def test_default_model_batched_equals_alone(default_rt):
    tok = default_rt.tokenizer
    reqs = [request(tok.encode(t), max_tokens=32) for t in DEFAULT_PROMPTS]
    got = Harness(default_rt, kv_cache_tokens=4096).run({0: reqs[:2], 2: reqs[2:3], 5: reqs[3:]})
    for req in reqs:
        assert_same(got[(req.request_id, 0)], alone(default_rt, req, kv_cache_tokens=4096))
