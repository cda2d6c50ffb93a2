"""engine/output.py with real tokenizers: stop strings split across tokens, hold-back, EOS, stop ids,
length limits, UTF-8 split across tokens. The reference is the tokenizer's own decode of the ids."""

from __future__ import annotations

import itertools

import pytest

from app.engine.output import OutputProcessor
from app.engine.sequence import Sequence
from app.engine.types import FinishReason, RequestOutput, SampledToken, SamplingParams
from app.tokenizer.detokenizer import IncrementalDetokenizer
from app.tokenizer.tokenizer import Tokenizer
from tests.support.models import tiny_llama

TEXT = "Hello, world! How are you today? Café 🙂🚀 naïve."
MAX_MODEL_LEN = 4096
_ids = itertools.count()


@pytest.fixture(scope="module", params=["tiny", "default"])
def tok(request, tmp_path_factory) -> Tokenizer:
    if request.param == "tiny":
        return Tokenizer.load(tiny_llama(tmp_path_factory))
    return Tokenizer.load(request.getfixturevalue("default_model_path"))


def processor(tok: Tokenizer, max_model_len: int = MAX_MODEL_LEN) -> OutputProcessor:
    return OutputProcessor(tok, tok.eos_token_ids, max_model_len, IncrementalDetokenizer)


def new_seq(prompt_len: int = 3, **params) -> Sequence:
    params = {"max_tokens": 1000, **params}
    return Sequence(next(_ids), "r", 0, tuple(range(10, 10 + prompt_len)), SamplingParams(**params))


def feed(proc: OutputProcessor, seq: Sequence, ids: list[int]) -> list[RequestOutput]:
    """Process ids one by one until the sequence finishes."""
    outs = []
    for i in ids:
        outs.append(proc.process(seq, SampledToken(seq.seq_id, i)))
        if outs[-1].finish_reason is not None:
            break
    return outs


def text_of(outs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outs)


def spanning_stops(tok: Tokenizer, ids: list[int]) -> list[str]:
    """Substrings of the decoded text that start inside one token and end inside a later one."""
    starts, pos = [], 0
    for i in range(len(ids)):
        piece = tok.decode(ids[: i + 1])
        starts.append((pos, len(piece)))
        pos = len(piece)
    text = tok.decode(ids)
    stops = set()
    for (a0, a1), (b0, b1) in itertools.pairwise(starts):
        if a1 - a0 >= 2 and b1 - b0 >= 1:
            stops.add(text[a1 - 1 : b0 + 1])  # last char of one token + first char of the next
        if b1 - a0 >= 3:
            stops.add(text[a0 + 1 : b1])
    return sorted(s for s in stops if s.strip() and "\ufffd" not in s)


def test_stop_strings_split_across_tokens_are_caught_and_never_leak(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    text = tok.decode(ids)
    stops = spanning_stops(tok, ids)
    assert len(stops) >= 10
    for stop in stops:
        idx = text.find(stop)
        for include in (False, True):
            seq = new_seq(stop=(stop, "never-there"), include_stop_str_in_output=include)
            outs = feed(processor(tok), seq, ids)
            assert outs[-1].finish_reason is FinishReason.STOP, stop
            want = text[: idx + len(stop)] if include else text[:idx]
            assert text_of(outs) == want, stop
            emitted = ""
            for o in outs:  # at no point did anything past the stop's start reach the client
                emitted += o.text
                assert want.startswith(emitted), (stop, emitted)
            assert [t for o in outs for t in o.token_ids] == ids[: len(outs)]


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    text = tok.decode(ids)
    outs = feed(processor(tok), new_seq(stop=("today", "are y", "world")), ids)
    assert text_of(outs) == text[: text.index("world")]


def test_hold_back_is_released_when_the_sequence_ends(tok):
    ids = tok.encode("How are you today", add_special_tokens=False)
    text = tok.decode(ids)
    # " today" is held while it could still become " toddler"; max_tokens ends it: all text comes out
    stop = (" toddler",)
    outs = feed(processor(tok), new_seq(stop=stop, max_tokens=len(ids)), ids)
    assert outs[-1].finish_reason is FinishReason.LENGTH and len(outs) == len(ids)
    assert text_of(outs) == text
    assert not text_of(outs[:-1]).endswith(" t")  # it really was held back before the end
    # an abort (or timeout) releases it too
    seq = new_seq(stop=stop)
    proc = processor(tok)
    outs = feed(proc, seq, ids)
    assert outs[-1].finish_reason is None
    last = proc.finish_early(seq, FinishReason.ABORT)
    assert text_of([*outs, last]) == text and last.finish_reason is FinishReason.ABORT


def test_utf8_split_across_tokens_is_never_emitted_half(tok):
    ids = tok.encode("Café 🙂🚀 naïve 日本語", add_special_tokens=False)
    outs = feed(processor(tok), new_seq(max_tokens=len(ids)), ids)
    assert all("\ufffd" not in o.text for o in outs)
    assert text_of(outs) == "Café 🙂🚀 naïve 日本語"


def test_eos_stop_ids_and_min_tokens(tok):
    eos = tok.eos_token_ids[0]
    ids = tok.encode("Hello, world! How are you", add_special_tokens=False)
    assert len(ids) > 4
    text = tok.decode(ids)
    outs = feed(processor(tok), new_seq(), [*ids, eos, *ids])
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].token_ids == (eos,)
    assert text_of(outs) == text and outs[-1].completion_tokens == len(ids) + 1
    # ignore_eos: EOS is just another token
    outs = feed(processor(tok), new_seq(ignore_eos=True, max_tokens=len(ids) + 2), [*ids, eos, *ids])
    assert outs[-1].finish_reason is FinishReason.LENGTH and len(outs) == len(ids) + 2
    # a stop token id ends the choice and its text is not part of the output
    stop_id = ids[3]
    outs = feed(processor(tok), new_seq(stop_token_ids=(stop_id,)), ids)
    assert outs[-1].finish_reason is FinishReason.STOP and len(outs) == 4
    assert text_of(outs) == tok.decode(ids[:3])
    # before min_tokens an end id does not end the choice
    outs = feed(processor(tok), new_seq(min_tokens=3), [ids[0], eos, ids[1], eos])
    assert [o.finish_reason for o in outs] == [None, None, None, FinishReason.STOP]


def test_length_limits(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    outs = feed(processor(tok), new_seq(max_tokens=5), ids)
    assert [o.finish_reason for o in outs] == [None] * 4 + [FinishReason.LENGTH]
    assert [o.completion_tokens for o in outs] == [1, 2, 3, 4, 5]
    assert text_of(outs) == tok.decode(ids[:5])
    # the context limit: prompt (3) + outputs reach max_model_len
    outs = feed(processor(tok, max_model_len=10), new_seq(prompt_len=3), ids)
    assert len(outs) == 7 and outs[-1].finish_reason is FinishReason.LENGTH


def test_logprobs_carry_token_texts(tok):
    ids = tok.encode("Hello", add_special_tokens=False)
    seq = new_seq(logprobs=2)
    top = ((ids[0], -0.1), (ids[-1], -2.5))
    out = processor(tok).process(seq, SampledToken(seq.seq_id, ids[0], -0.1, top))
    (lp,) = out.logprobs
    assert (lp.token_id, lp.token, lp.logprob) == (ids[0], tok.token_text(ids[0]), -0.1)
    assert lp.top == tuple((i, tok.token_text(i), v) for i, v in top)
