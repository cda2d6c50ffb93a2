"""The engine's boundary types: what rank 0's sampler is sent of a request, and nothing more."""

from __future__ import annotations

from dataclasses import fields

from app.engine.types import SamplerParams, SamplingParams, SeqSampling

EOS = (2, 3)


def test_the_sampler_gets_only_what_it_reads() -> None:
    engine_only = {"n", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
                   "skip_special_tokens"}  # fmt: skip
    sent = {f.name for f in fields(SamplerParams)}
    assert sent == {f.name for f in fields(SamplingParams)} - engine_only


def test_each_choice_of_a_seeded_request_has_its_own_seed() -> None:
    params = SamplingParams(seed=41, n=3, temperature=0.7, top_k=5)
    got = [SeqSampling.of(i, params, i, (1, 2), EOS) for i in range(3)]
    assert [g.params.seed for g in got] == [41, 42, 43]
    assert {(g.params.temperature, g.params.top_k) for g in got} == {(0.7, 5)}
    assert SeqSampling.of(0, SamplingParams(), 2, (1,), EOS).params.seed is None  # unseeded stays so


def test_prompt_and_end_ids_travel_only_when_the_sampler_needs_them() -> None:
    plain = SeqSampling.of(0, SamplingParams(), 0, (5, 6, 7), EOS)
    assert (plain.prompt_token_ids, plain.end_token_ids) == ((), ())
    penalized = SeqSampling.of(0, SamplingParams(repetition_penalty=1.3), 0, (5, 6, 7), EOS)
    assert penalized.prompt_token_ids == (5, 6, 7)
    held = SeqSampling.of(0, SamplingParams(min_tokens=4, stop_token_ids=(9,)), 0, (5,), EOS)
    assert held.end_token_ids == (9, 2, 3) and held.params.min_tokens == 4
    no_eos = SeqSampling.of(
        0, SamplingParams(min_tokens=4, stop_token_ids=(9,), ignore_eos=True), 0, (5,), EOS
    )
    assert no_eos.end_token_ids == (9,)
