"""Constrained decoding pieces without a server: the grammar compiler and its masks, the masked
sampler, the tool-call parser and the tool prompt for templates without tool support."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from app.api.messages import ChatTool
from app.api.tool_parsers import CallEvent, ContentEvent, HermesParser
from app.api.tools import inject_tools
from app.engine.grammar import GrammarCompiler, GrammarError
from app.engine.types import NO_TOKEN, GrammarSpec, SamplingParams, SeqSampling
from app.tokenizer.chat_template import compile_template
from app.tokenizer.tokenizer import Tokenizer
from app.worker.runner import unpack_bitmask
from app.worker.sampler import Sampler


@pytest.fixture(scope="module")
def tok(default_model_path) -> Tokenizer:
    return Tokenizer.load(default_model_path)


@pytest.fixture(scope="module")
def compiler(tok) -> GrammarCompiler:
    return GrammarCompiler(tok.backend_json(), tok.vocab_size, tok.eos_token_ids, threads=1)


def allowed_ids(compiler: GrammarCompiler, matcher) -> set[int]:
    bits = unpack_bitmask(compiler.masks([matcher]), 1)[0, : compiler.vocab_size]
    return set(bits.nonzero().flatten().tolist())


def test_choice_mask_allows_exactly_the_prefixes_of_the_choices(tok, compiler) -> None:
    choices = ["yes", "no", "maybe"]
    m = compiler.matcher(GrammarSpec("choice", json.dumps(choices)))
    allowed = allowed_ids(compiler, m)
    # independent of llguidance: a token is allowed iff its text starts one of the choices
    expected = {
        i for i in range(tok.vocab_size)
        if not tok.is_special(i) and (t := tok.token_bytes(i)) and any(c.encode().startswith(t) for c in choices)
    }  # fmt: skip
    assert allowed == expected and tok.encode("yes", add_special_tokens=False)[0] in allowed


def test_a_finished_grammar_allows_only_the_end_of_sequence(tok, compiler) -> None:
    m = compiler.matcher(GrammarSpec("regex", r"[0-9]{3}"))
    for t in tok.encode("123", add_special_tokens=False):
        assert m.consume_token(t)
    assert allowed_ids(compiler, m) == set(tok.eos_token_ids)


def test_compiled_grammars_are_cached_by_spec(compiler) -> None:
    spec = GrammarSpec(
        "json_schema", json.dumps({"type": "object", "properties": {"cache_probe": {"type": "integer"}}})
    )
    before = compiler.compiled
    a, b = compiler.matcher(spec), compiler.matcher(spec)
    assert compiler.compiled == before + 1 and a is not b  # one compile, two independent states


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("json_schema", '{"type": "bogus"}'), "bogus"),
        (GrammarSpec("json_schema", '{"type": "string", "format": "no-such-format"}'), "no-such-format"),
        (GrammarSpec("json_schema", '{"$ref": "#/$defs/missing"}'), "missing"),
        (GrammarSpec("regex", "a(b"), "unclosed group"),
        (GrammarSpec("grammar", "root ::= ("), "Expected '\\)'"),
        (GrammarSpec("choice", "not json"), "Expecting value"),
    ],
)
def test_bad_specs_are_errors_naming_the_problem(compiler, spec, message) -> None:
    with pytest.raises(GrammarError, match=message):
        compiler.check(spec)


def test_gbnf_grammars_compile(tok, compiler) -> None:
    m = compiler.matcher(GrammarSpec("grammar", 'root ::= "x" [0-9]+'))
    assert m.try_consume_tokens(tok.encode("x42", add_special_tokens=False)) > 0 and not m.is_error()


# ---- the masked sampler ---------------------------------------------------------------------------


def _sampler(vocab: int, params: SamplingParams, n: int) -> Sampler:
    s = Sampler(vocab)
    for i in range(n):
        s.add(SeqSampling.of(i, params, 0, (1, 2), (0,)))
    return s


def _mask(vocab: int, allowed: list[int]) -> torch.Tensor:
    words = torch.zeros((vocab + 31) // 32, dtype=torch.int64)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return unpack_bitmask(words.to(torch.int32).numpy().tobytes(), 1)[0]


def test_masked_rows_pick_only_allowed_tokens_and_free_rows_are_untouched() -> None:
    vocab = 100
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0.0, logprobs=0)
    free = _sampler(vocab, greedy, 3).sample(logits.clone(), [0, 1, 2], [0, 0, 0])
    masked = _sampler(vocab, greedy, 3).sample(
        logits.clone(), [0, 1, 2], [0, 0, 0], {1: _mask(vocab, [7, 42])}
    )
    assert masked[1].token_id == (7 if logits[1, 7] > logits[1, 42] else 42)
    assert masked[0] == free[0] and masked[2] == free[2]
    assert masked[1].logprob == pytest.approx(float(torch.log_softmax(logits[1], -1)[masked[1].token_id]))
    sampled = SamplingParams(temperature=1.5, top_p=0.9, seed=3)
    for step in range(50):
        tok = _sampler(vocab, sampled, 1).sample(
            logits[:1].clone(), [0], [step], {0: _mask(vocab, [5, 6, 99])}
        )
        assert tok[0].token_id in (5, 6, 99)


def test_a_mask_that_leaves_nothing_answers_no_token() -> None:
    vocab = 64
    params = SamplingParams(temperature=0.0, min_tokens=5)  # EOS (id 0) banned for 5 tokens
    out = _sampler(vocab, params, 2).sample(torch.zeros(2, vocab), [0, 1], [0, 0], {0: _mask(vocab, [0])})
    assert out[0].token_id == NO_TOKEN and out[1].token_id != NO_TOKEN


def test_tokens_past_the_mask_are_forbidden() -> None:
    # the model's vocabulary may be padded past the tokenizer's: those ids are never allowed
    logits = torch.zeros(1, 70)
    logits[0, 69] = 100.0
    out = _sampler(70, SamplingParams(temperature=0.0), 1).sample(logits, [0], [0], {0: _mask(64, [3])})
    assert out[0].token_id == 3


# ---- the Hermes tool-call parser ------------------------------------------------------------------

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _run(pieces: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    p = HermesParser()
    events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
    text = "".join(e.text for e in events if isinstance(e, ContentEvent))
    calls = [(e.name, json.loads(e.arguments)) for e in events if isinstance(e, CallEvent)]
    assert [e.index for e in events if isinstance(e, CallEvent)] == list(range(len(calls)))
    return text, calls


@given(st.lists(st.integers(min_value=1, max_value=len(CALL) * 2 + 10), max_size=8))
def test_the_parser_gives_the_same_result_however_the_text_is_split(cuts) -> None:
    text = "Let me check. " + CALL + "\n" + CALL.replace("Paris", "Oslo") + " done <tool"
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert (
        _run(pieces)
        == _run([text])
        == (
            "Let me check. \n done <tool",
            [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})],
        )
    )


def test_what_is_not_a_call_stays_text() -> None:
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert _run([broken]) == (broken, [])
    assert _run(["<tool_call>[1, 2]</tool_call>"]) == ("<tool_call>[1, 2]</tool_call>", [])
    # an unclosed call at the very end still counts when its body is a whole call
    assert _run([CALL.removesuffix("</tool_call>")])[1] == [("get_weather", {"city": "Paris"})]
    # arguments given as a JSON string are read as the object they hold
    as_string = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert _run([as_string]) == ("", [("f", {"a": 1})])


# ---- tools in templates ---------------------------------------------------------------------------

TOOL = ChatTool.model_validate(
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
)


def test_templates_that_render_tools_are_recognised(tok) -> None:
    assert not tok.template_knows_tools()  # SmolLM2's template has no tools
    knows = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert compile_template(knows).knows_tools


def test_inject_tools_renders_a_whole_tool_conversation_through_a_plain_template(tok) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
    ]
    messages = inject_tools(conversation, [TOOL])
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call functions")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
