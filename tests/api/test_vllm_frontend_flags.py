"""vLLM's frontend flags that shape responses, through the official openai client on a real server:
--response-role, --max-logprobs, --logprobs-mode, --return-tokens-as-token-ids,
--enable-force-include-usage, --enable-prompt-tokens-details, --default-chat-template-kwargs.

One started stack serves a fresh app per test with that test's flags (the API reads them, the
ranks do not); --logprobs-mode is the sampler's, so each mode gets a stack of its own. References:
the `tokenizers` library for token ids and strings, transformers' LlamaForCausalLM on the same
weights for logprobs and logits, and the same request on a server without the flag."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

from app.settings import Settings
from tests.support.api_server import SharedStack, live_app, started_stack, tiny_settings
from tests.support.models import CHAT_TEMPLATE, tiny_llama

pytestmark = pytest.mark.timeout(180)
# the test model's template, saying whether the thinking variable reached it
TEMPLATE = (
    "{% if enable_thinking is defined and not enable_thinking %}no thinking\n{% endif %}" + CHAT_TEMPLATE
)
USER = [{"role": "user", "content": "Hello, how are you today?"}]
PROMPT = "The quick brown fox jumps over the lazy dog."
TOL = 1e-4  # fp32 against transformers' fp32: different kernels, same arithmetic up to rounding


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def vocab(model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def flagged(model_dir, **flags: Any) -> Settings:
    return tiny_settings(model_dir, chat_template=TEMPLATE, **flags)


@pytest.fixture(scope="module")
def stack(model_dir) -> Iterator[SharedStack]:
    with started_stack(flagged(model_dir)) as shared:
        yield shared


@pytest.fixture
def serve(model_dir, stack):
    """serve(**flags): a context manager yielding (openai client, server URL) for an app with flags."""

    @contextlib.contextmanager
    def run(**flags: Any) -> Iterator[tuple[openai.OpenAI, str]]:
        with live_app(flagged(model_dir, **flags), stack) as srv, srv.openai() as client:
            yield client, srv.url

    return run


def ids_of(vocab: Tokenizer, text: str) -> list[int]:
    return vocab.encode(text, add_special_tokens=False).ids


def chat(client: openai.OpenAI, messages: list[dict] = USER, **kw: Any) -> Any:
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)


# ---- --response-role ------------------------------------------------------------------------------


def test_response_role_names_the_reply_in_responses_and_stream_deltas(serve) -> None:
    with serve(response_role="bot") as (client, _):
        assert chat(client, max_tokens=3).choices[0].message.role == "bot"
        chunks = list(chat(client, max_tokens=3, stream=True))
        assert chunks[0].choices[0].delta.role == "bot"
        assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    with serve() as (client, _):
        assert chat(client, max_tokens=3).choices[0].message.role == "assistant"  # vLLM's default


def test_without_a_generation_prompt_the_reply_continues_the_last_message_and_its_role(serve) -> None:
    partial = [*USER, {"role": "assistant", "content": "I am"}]
    with serve(response_role="bot") as (client, _):
        kw: dict[str, Any] = {"max_tokens": 3, "extra_body": {"add_generation_prompt": False, "echo": True}}
        r = chat(client, partial, **kw)
        assert r.choices[0].message.role == "assistant"  # the last message's role, not --response-role
        assert r.choices[0].message.content.startswith("I am")  # echo: same role, so it is continued
        first = next(iter(chat(client, partial, stream=True, **kw)))
        assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == "I am"
        # with a generation prompt the reply is a new "bot" message: nothing of "assistant" is echoed
        fresh = chat(client, partial, max_tokens=3, extra_body={"echo": True})
        assert fresh.choices[0].message.role == "bot" and not fresh.choices[0].message.content.startswith(
            "I am"
        )


# ---- --max-logprobs -------------------------------------------------------------------------------


def _rejected(call: Any) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400
    return e.value.body  # type: ignore[return-value]


def test_max_logprobs_bounds_every_logprobs_field_with_a_400_naming_it(serve) -> None:
    with serve(max_logprobs=3) as (client, _):
        r = chat(client, max_tokens=2, logprobs=True, top_logprobs=3)
        assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content)
        calls = {
            "top_logprobs": lambda: chat(client, max_tokens=2, logprobs=True, top_logprobs=4),
            "logprobs": lambda: client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=2, logprobs=4
            ),
            "prompt_logprobs": lambda: client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": 4}
            ),
        }
        for param, call in calls.items():
            err = _rejected(call)
            assert err["param"] == param and err["type"] == "invalid_request_error"
            assert f"{param} of 4" in err["message"] and "max allowed: 3" in err["message"]


def test_max_logprobs_defaults_to_vllms_20_and_minus_1_means_the_vocabulary(serve, vocab) -> None:
    size = vocab.get_vocab_size()
    with serve() as (client, _):  # completions took at most 5 (OpenAI's) before; vLLM's bound is 20
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, logprobs=20, temperature=0)
        assert len(r.choices[0].logprobs.top_logprobs[0]) > 5  # a dict: tokens sharing a text are one key
        r = chat(client, max_tokens=1, logprobs=True, top_logprobs=20)
        assert len(r.choices[0].logprobs.content[0].top_logprobs) == 20
        err = _rejected(lambda: chat(client, max_tokens=1, logprobs=True, top_logprobs=21))
        assert err["param"] == "top_logprobs" and "max allowed: 20" in err["message"]
    with serve(max_logprobs=-1, return_tokens_as_token_ids=True) as (client, _):
        r = chat(client, max_tokens=1, logprobs=True, top_logprobs=size)
        top = r.choices[0].logprobs.content[0].top_logprobs
        assert sorted(int(t.token.removeprefix("token_id:")) for t in top) == list(range(size))
        err = _rejected(lambda: chat(client, max_tokens=1, logprobs=True, top_logprobs=size + 1))
        assert f"max allowed: {size}" in err["message"]


# ---- --return-tokens-as-token-ids -----------------------------------------------------------------


def test_tokens_as_token_ids_in_chat_logprobs_with_the_tokens_bytes(serve, vocab) -> None:
    kw: dict[str, Any] = {
        "max_tokens": 6,
        "logprobs": True,
        "top_logprobs": 3,
        "extra_body": {"ignore_eos": True},
    }
    with serve() as (client, _):
        plain = chat(client, **kw).choices[0].logprobs.content
    with serve(return_tokens_as_token_ids=True) as (client, _):
        named = chat(client, **kw).choices[0].logprobs.content
    assert len(named) == len(plain) == 6
    for a, b in zip(named, plain, strict=True):
        token_id = int(a.token.removeprefix("token_id:"))
        assert (
            a.token == f"token_id:{token_id}"
            and vocab.decode([token_id], skip_special_tokens=False) == b.token
        )
        assert a.bytes == b.bytes and a.logprob == b.logprob
        for ta, tb in zip(a.top_logprobs, b.top_logprobs, strict=True):
            alt = int(ta.token.removeprefix("token_id:"))
            assert vocab.decode([alt], skip_special_tokens=False) == tb.token and ta.bytes == tb.bytes


def test_tokens_as_token_ids_in_completion_logprobs_echo_included(serve, vocab) -> None:
    ids = ids_of(vocab, PROMPT)
    kw: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "logprobs": 2, "temperature": 0}
    with serve() as (client, _):
        plain = client.completions.create(**kw, echo=True).choices[0].logprobs
    with serve(return_tokens_as_token_ids=True) as (client, _):
        named = client.completions.create(**kw, echo=True).choices[0].logprobs
        streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True) if c.choices]
    got = [int(t.removeprefix("token_id:")) for t in named.tokens]
    assert got[: len(ids)] == ids  # the echoed prompt's tokens, its first (unscored) one included
    assert [vocab.decode([i], skip_special_tokens=False) for i in got] == plain.tokens
    assert named.text_offset == plain.text_offset  # offsets still count the text's characters
    assert named.token_logprobs == plain.token_logprobs
    for top, plain_top in zip(named.top_logprobs[1:], plain.top_logprobs[1:], strict=True):
        assert all(k.startswith("token_id:") for k in top)
        assert sorted(plain_top.values()) == pytest.approx(sorted(top.values())[-len(plain_top) :])
    stream_tokens = [t for lp in streamed if lp is not None for t in lp.tokens]
    assert stream_tokens == named.tokens[len(ids) :]


# ---- usage: --enable-force-include-usage, --enable-prompt-tokens-details ---------------------------


def test_force_include_usage_ends_every_stream_with_the_usage(serve) -> None:
    kw: dict[str, Any] = {"max_tokens": 5, "extra_body": {"ignore_eos": True}}
    with serve(enable_force_include_usage=True) as (client, _):
        whole = chat(client, **kw).usage
        chunks = list(chat(client, stream=True, **kw))
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.model_dump()
        assert all(c.usage is None for c in chunks[:-1])
        done = list(client.completions.create(model="tiny", prompt=PROMPT, stream=True, temperature=0, **kw))
        assert done[-1].choices == [] and done[-1].usage.completion_tokens == 5
    with serve() as (client, _):  # without it, only stream_options.include_usage asks for it
        assert all(c.usage is None for c in chat(client, stream=True, **kw))


def test_prompt_tokens_details_only_with_the_flag(serve, vocab) -> None:
    prompt = "A server answers requests in batches; each step runs one forward pass. " * 4
    assert len(ids_of(vocab, prompt)) > 32
    kw: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": 1}
    with serve() as (client, url):
        client.completions.create(**kw)  # fills the prefix cache
        assert client.completions.create(**kw).usage.prompt_tokens_details is None
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens_details is None
        raw = httpx.post(url + "/v1/completions", json=kw).json()
        assert "prompt_tokens_details" not in raw["usage"]  # absent, as vLLM's
    with serve(enable_prompt_tokens_details=True) as (client, _):
        usage = client.completions.create(**kw).usage
        assert usage.prompt_tokens == len(ids_of(vocab, prompt))
        assert usage.prompt_tokens_details.cached_tokens >= 32  # two whole 16-token blocks at least
        miss = client.completions.create(model="tiny", prompt="Paris is the capital of France.", max_tokens=1)
        assert miss.usage.prompt_tokens_details.cached_tokens == 0


# ---- --default-chat-template-kwargs ---------------------------------------------------------------


def test_default_chat_template_kwargs_go_under_the_requests(serve, vocab) -> None:
    rendered = "<|im_start|>user\nHello, how are you today?<|im_end|>\n<|im_start|>assistant\n"
    plain, thinking_off = ids_of(vocab, rendered), ids_of(vocab, "no thinking\n" + rendered)
    assert len(thinking_off) > len(plain)

    def prompt_ids(client: openai.OpenAI, url: str, **extra: Any) -> list[int]:
        tokens = httpx.post(url + "/tokenize", json={"messages": USER, **extra}).json()["tokens"]
        usage = chat(client, max_tokens=1, extra_body=extra).usage
        assert usage.prompt_tokens == len(tokens)  # /tokenize counts what chat runs
        return tokens

    with serve(default_chat_template_kwargs='{"enable_thinking": false}') as (client, url):
        assert prompt_ids(client, url) == thinking_off
        assert (
            prompt_ids(client, url, chat_template_kwargs={"enable_thinking": True}) == plain
        )  # request wins
        assert (
            prompt_ids(client, url, chat_template_kwargs={"other": 1}) == thinking_off
        )  # merged, not replaced
    with serve() as (client, url):
        assert prompt_ids(client, url) == plain


# ---- --logprobs-mode ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"])
def test_logprobs_mode_reports_the_raw_or_the_sampled_distribution(model_dir, vocab, hf, mode) -> None:
    """Sampled at temperature 0.5 within top_k 3: raw is transformers' distribution, processed the
    one sampled from (the rest -inf, which JSON carries as -9999)."""
    settings = tiny_settings(model_dir, logprobs_mode=mode, return_tokens_as_token_ids=True)
    ids = ids_of(vocab, PROMPT)
    with started_stack(settings) as own, live_app(settings, own) as srv, srv.openai() as client:
        r = client.completions.create(
            model="tiny", prompt=ids, max_tokens=4, logprobs=4, temperature=0.5, seed=3,
            extra_body={"top_k": 3, "ignore_eos": True},
        )  # fmt: skip
    lp = r.choices[0].logprobs
    out = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    with torch.no_grad():
        logits = hf(torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1 :].float()
    if mode.startswith("processed"):
        logits = logits / 0.5
        logits = logits.masked_fill(logits < logits.topk(3, dim=-1).values[:, -1:], float("-inf"))
    ref = logits if mode.endswith("logits") else torch.log_softmax(logits, dim=-1)
    ref = ref.clamp(min=-9999.0)
    for row, (token, value, top) in enumerate(zip(out, lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert value == pytest.approx(float(ref[row, token]), abs=TOL)
        want = {f"token_id:{i}": float(ref[row, i]) for i in ref[row].topk(4).indices.tolist()}
        if mode.startswith("processed"):  # three kept; the fourth is any of the cut ones
            assert sorted(top.values())[0] == -9999.0
            want = dict(sorted(want.items(), key=lambda kv: -kv[1])[:3])
        assert {k: top[k] for k in want} == pytest.approx(want, abs=TOL)
