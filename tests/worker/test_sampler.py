"""Rank 0's batched Sampler, directly on logits tensors: each feature against a hand computation or
the softmax it must sample from."""

from __future__ import annotations

import itertools

import pytest
import torch

from app.engine.types import SamplingParams, SeqSampling
from app.worker.sampler import Sampler

V = 12
EOS = 2
_ids = itertools.count()


def add(sampler: Sampler, prompt=(5, 6), **params) -> int:
    sid = next(_ids)
    sampler.add(SeqSampling.of(sid, SamplingParams(**params), 0, tuple(prompt), (EOS,)))
    return sid


def rand_logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def sample_one(sampler: Sampler, sid: int, logits: torch.Tensor, n_out: int = 0):
    return sampler.sample(logits[None].clone(), [sid], [n_out])[0]


# Chi-square critical values at p = 0.001 by degrees of freedom: the draws are seeded, so a pass is
# deterministic, and a wrong distribution (e.g. temperature ignored) lands orders of magnitude above.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32, 11: 31.26}


def chi_square(counts: torch.Tensor, probs: torch.Tensor, draws: int) -> tuple[float, int]:
    keep = probs > 0
    expected = probs[keep] * draws
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def draw_counts(params: dict, logits: torch.Tensor, draws: int = 6000, seed: int = 0) -> torch.Tensor:
    """Token counts of `draws` unseeded draws from one logits row, `rows` at a time in one batch."""
    sampler = Sampler(V, seed=seed)
    rows = 500
    sids = [add(sampler, **params) for _ in range(rows)]
    counts = torch.zeros(V)
    for _ in range(draws // rows):
        for tok in sampler.sample(logits.expand(rows, -1).clone(), sids, [0] * rows):
            counts[tok.token_id] += 1
    return counts


# ---- distributions -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_samples_softmax_of_scaled_logits(temperature):
    logits = rand_logits(1, seed=3)[0]
    counts = draw_counts({"temperature": temperature}, logits)
    stat, dof = chi_square(counts, torch.softmax(logits / temperature, -1), 6000)
    assert stat < CHI2_999[dof]
    # and not the untempered distribution
    if temperature != 1.0:
        assert chi_square(counts, torch.softmax(logits, -1), 6000)[0] > 5 * CHI2_999[dof]


def test_top_k_top_p_min_p_sample_the_renormalised_head():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5])
    probs = torch.softmax(logits, -1)
    cases = {
        "top_k": ({"temperature": 1.0, "top_k": 3}, torch.arange(V) < 3),
        # smallest prefix whose mass reaches 0.7: the token crossing it included
        "top_p": ({"temperature": 1.0, "top_p": 0.7}, (probs.cumsum(0) - probs) < 0.7),
        "min_p": ({"temperature": 1.0, "min_p": 0.3}, probs >= 0.3 * probs.max()),
    }
    for name, (params, keep) in cases.items():
        assert 1 < keep.sum() < V, name
        target = torch.where(keep, probs, 0.0)
        counts = draw_counts(params, logits)
        stat, dof = chi_square(counts, target / target.sum(), 6000)
        assert stat < CHI2_999[dof], name


def test_untruncated_rows_sample_the_full_softmax_whatever_their_neighbours():
    """A row without top-k/top-p/min-p keeps every token, bitwise, even when a neighbour sends the
    batch through the sort-and-cut path (a real vocabulary: fp32 cumsum reaches 1.0 early)."""
    x = torch.randn(4, 49152, generator=torch.Generator().manual_seed(1)) * 3
    neighbours = [SamplingParams(top_p=0.5), SamplingParams(top_k=3), SamplingParams(min_p=0.2)]
    for params in ([SamplingParams(), *neighbours], [SamplingParams(top_k=0, top_p=1.0, min_p=0.0)] * 4):
        _, probs = Sampler._probs(x.clone(), params)  # the private hook: what the row samples from
        assert torch.equal(probs[0], torch.softmax(x[0], -1))


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = rand_logits(64, seed=4)
    sampler = Sampler(V)
    greedy = [add(sampler, temperature=0.0) for _ in range(64)]
    expected = [t.token_id for t in sampler.sample(logits.clone(), greedy, [0] * 64)]
    assert expected == logits.argmax(-1).tolist()
    for params in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        sids = [add(sampler, temperature=1.5, **params) for _ in range(64)]
        assert [t.token_id for t in sampler.sample(logits.clone(), sids, [0] * 64)] == expected


# ---- seeds -------------------------------------------------------------------------------------


def test_seeded_rows_ignore_neighbours_and_runs():
    logits = rand_logits(6, seed=5)
    logits[0] /= 4  # the target's row: flat enough that its stream visits many tokens
    target = {"temperature": 1.0, "seed": 77, "top_p": 0.9}

    def stream(neighbours: list[dict], rows_before: int) -> list[int]:
        sampler = Sampler(V, seed=len(neighbours))  # the unseeded generator differs too
        sid = add(sampler, **target)
        others = [add(sampler, **p) for p in neighbours]
        out = []
        for i in range(20):
            order = [*others[:rows_before], sid, *others[rows_before:]]
            batch = torch.cat([logits[1 : rows_before + 1], logits[:1], logits[rows_before + 1 : len(order)]])
            toks = sampler.sample(batch.clone(), order, [i] * len(order))
            out.append(toks[rows_before].token_id)
        return out

    solo = stream([], 0)
    assert len(set(solo)) > 3  # really sampling
    assert stream([], 0) == solo
    mixed = [{"temperature": 0.0}, {"temperature": 2.0, "top_k": 3}, {"temperature": 0.7, "seed": 1}]
    assert stream(mixed, 2) == solo
    assert stream([*mixed[:1], {"temperature": 1.0, "min_p": 0.2}], 1) == solo
    other = Sampler(V)
    sid = add(other, **{**target, "seed": 78})
    assert [sample_one(other, sid, logits[0], i).token_id for i in range(20)] != solo


def test_seeded_row_depends_only_on_the_token_index():
    """A preempted sequence resamples its tokens after recompute: same index, same token."""
    logits = rand_logits(1, seed=6)[0]
    a, b = Sampler(V), Sampler(V)
    sa, sb = add(a, temperature=1.0, seed=3), add(b, temperature=1.0, seed=3)
    forward = [sample_one(a, sa, logits, i).token_id for i in range(10)]
    backward = [sample_one(b, sb, logits, i).token_id for i in reversed(range(10))]
    assert forward == backward[::-1]


# ---- penalties, bias, min_tokens -----------------------------------------------------------------


def test_penalties_and_logit_bias_decide_greedy_as_computed_by_hand():
    """Greedy takes the argmax of the processed logits; each case puts it where only the right
    formula leaves it (prompt tokens 4 and 5)."""
    cases = [
        # repetition: a positive logit is divided (2.5 / 1.25 = 2.0 > 1.95) ...
        ({"repetition_penalty": 1.25}, {4: 2.5, 1: 1.95}, 4),
        ({"repetition_penalty": 1.3}, {4: 2.5, 1: 1.95}, 1),  # 1.92 < 1.95
        # ... a negative one multiplied (-0.1 * 2 = -0.2 < -0.15; dividing would give -0.05)
        ({"repetition_penalty": 2.0}, {5: -0.1, 0: -0.15, 1: -0.25}, 0),
        ({"logit_bias": ((7, 0.5), (3, -9.0))}, {3: 2.0, 7: 1.0, 1: 1.45}, 7),  # 1.5 > 1.45 > -7
    ]
    for params, values, expected in cases:
        logits = torch.full((V,), -5.0)
        for i, x in values.items():
            logits[i] = x
        sampler = Sampler(V)
        sid = add(sampler, prompt=(4, 5), temperature=0.0, **params)
        assert sample_one(sampler, sid, logits).token_id == expected, params


def test_presence_and_frequency_penalties_count_output_tokens_only():
    sampler = Sampler(V)
    sid = add(sampler, prompt=(9, 9, 9), temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    forced = torch.full((V,), -5.0)
    forced[6] = 10.0
    for i in range(3):
        assert sample_one(sampler, sid, forced, i).token_id == 6
    # token 6 now carries 0.5 + 3 * 0.25 = 1.25 of penalty; prompt token 9 none
    for x9, expected in ((0.8, 9), (0.7, 6)):
        logits = torch.full((V,), -5.0)
        logits[6], logits[9] = 2.0, x9
        assert sample_one(sampler, sid, logits, 3).token_id == expected
        sampler.states[sid].output_counts[expected] -= 1  # forget this probe's own token


def test_penalties_exact_values():
    """The processed row itself, against the formulas (private hook: the only place it exists)."""
    sampler = Sampler(V)
    params = {"repetition_penalty": 1.5, "presence_penalty": 0.3, "frequency_penalty": 0.2,
              "logit_bias": ((0, 1.0), (11, -2.0))}  # fmt: skip
    sid = add(sampler, prompt=(1, 2), temperature=0.0, **params)
    st = sampler.states[sid]
    st.output_counts.update({3: 2, 1: 1})
    x = rand_logits(1, seed=8)
    want = x[0].clone()
    want[0] += 1.0
    want[11] -= 2.0
    for i in (1, 2, 3):
        want[i] = want[i] / 1.5 if want[i] > 0 else want[i] * 1.5
    want[3] -= 0.3 + 0.2 * 2
    want[1] -= 0.3 + 0.2 * 1
    sampler._penalize(x, 0, st, n_out=3)
    torch.testing.assert_close(x[0], want, rtol=0, atol=1e-6)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(V)
    logits[EOS], logits[9], logits[4] = 5.0, 4.0, 1.0
    sampler = Sampler(V)
    sid = add(sampler, temperature=0.0, min_tokens=3, stop_token_ids=(9,))
    assert [sample_one(sampler, sid, logits, i).token_id for i in range(4)] == [4, 4, 4, EOS]
    ignore = add(sampler, temperature=0.0, min_tokens=3, ignore_eos=True)
    assert sample_one(sampler, ignore, logits, 0).token_id == EOS  # ignore_eos: EOS is plain text


# ---- logprobs ----------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_sorted_top():
    logits = rand_logits(3, seed=9)
    sampler = Sampler(V)
    sids = [
        add(sampler, temperature=0.0, logprobs=4, repetition_penalty=1.5),  # penalties do not show
        add(sampler, temperature=0.8, logprobs=0, seed=1),
        add(sampler, temperature=0.0),
    ]
    toks = sampler.sample(logits.clone(), sids, [0, 0, 0])
    ref = torch.log_softmax(logits, -1)
    for row, tok in enumerate(toks[:2]):
        assert tok.logprob == pytest.approx(float(ref[row, tok.token_id]), abs=1e-6)
    top = toks[0].top_logprobs
    assert [i for i, _ in top] == ref[0].argsort(descending=True)[:4].tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    for i, lp in top:
        assert lp == pytest.approx(float(ref[0, i]), abs=1e-6)
    assert toks[1].top_logprobs == ()
    assert toks[2].logprob is None and toks[2].top_logprobs == ()


def _processed_logits(logits: torch.Tensor) -> torch.Tensor:
    """By hand, what the three rows of test_logprobs_modes sample from, as logits (-inf: cut)."""
    out = logits.clone()
    for i in (5, 6):  # row 0: greedy, repetition penalty 1.5 on the prompt's ids, no temperature
        out[0, i] = out[0, i] / 1.5 if out[0, i] > 0 else out[0, i] * 1.5
    row1 = logits[1] / 0.7  # temperature 0.7, top_k 4
    out[1] = row1.masked_fill(row1 < row1.topk(4).values[-1], float("-inf"))
    row2 = logits[2] / 1.3  # temperature 1.3, min_p 0.2
    probs = row2.softmax(-1)
    out[2] = row2.masked_fill(probs < 0.2 * probs.max(), float("-inf"))
    return out


@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"])
def test_logprobs_modes(mode) -> None:
    """vLLM's --logprobs-mode: the raw or the processed distribution, as logprobs or as logits."""
    logits = rand_logits(3, seed=11)
    sampler = Sampler(V, logprobs_mode=mode)
    sids = [
        add(sampler, temperature=0.0, logprobs=3, repetition_penalty=1.5),
        add(sampler, temperature=0.7, top_k=4, seed=1, logprobs=5),
        add(sampler, temperature=1.3, min_p=0.2, seed=2, logprobs=2),
    ]
    toks = sampler.sample(logits.clone(), sids, [0, 0, 0])
    source = logits if mode.startswith("raw") else _processed_logits(logits)
    ref = source if mode.endswith("logits") else torch.log_softmax(source, -1)
    for row, tok in enumerate(toks):
        assert tok.logprob == pytest.approx(float(ref[row, tok.token_id]), abs=1e-5), row
        assert torch.isfinite(torch.tensor(tok.logprob)), "a sampled token is never one that was cut"
        expected = ref[row].topk(len(tok.top_logprobs))
        finite = [i for i, v in tok.top_logprobs if v > float("-inf")]  # cut tokens tie in any order
        assert finite == expected.indices.tolist()[: len(finite)]
        assert [v for _, v in tok.top_logprobs] == pytest.approx(expected.values.tolist(), abs=1e-5)
    if mode.startswith("processed"):
        assert toks[1].top_logprobs[4][1] == float("-inf")  # outside top_k 4


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-8])
def test_a_vanishing_temperature_is_greedy_not_an_id_past_the_vocabulary(temperature) -> None:
    # found by `make fuzz`: logits / 1e-300 overflow to inf, the probabilities become NaN and the
    # inverse CDF answered id V, which crashed the next forward's embedding on every rank
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1)) * 30
    s = Sampler(100)
    for i in range(4):
        s.add(SeqSampling.of(i, SamplingParams(temperature=temperature, top_p=0.9), 0, (1,), (0,)))
    out = s.sample(logits.clone(), [0, 1, 2, 3], [0, 0, 0, 0])
    assert [t.token_id for t in out] == logits.argmax(dim=-1).tolist()
