"""vLLM's extra request fields, through the official openai client on a real server:
truncate_prompt_tokens, add_special_tokens, continue_final_message, documents,
return_tokens_as_token_ids per request, and the fields that would change the output and that we
do not implement (refused with a 400 naming them, never ignored). References: the `tokenizers`
library for ids and text, transformers' apply_chat_template for the prompt, and the same server
given the prompt the field should produce."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from tests.support.api_server import live_app, started_stack, tiny_settings
from tests.support.models import CHAT_TEMPLATE, tiny_llama

pytestmark = pytest.mark.timeout(180)
MAX_MODEL_LEN = 128
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away."
# a template that reads documents, over the test model's own
DOCS_TEMPLATE = (
    "{% for d in documents or [] %}<doc {{ d['title'] }}>{{ d['text'] }}\n{% endfor %}" + CHAT_TEMPLATE
)
BOS = "<|im_start|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that writes a BOS before a text, as Llama's do, so that
    add_special_tokens changes the prompt."""
    src = tiny_llama(tmp_path_factory)
    dst = tmp_path_factory.mktemp("bos_model")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    tok.save(str(dst / "tokenizer.json"))
    return dst


@pytest.fixture(scope="module")
def vocab(model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def client(model_dir) -> Iterator[openai.OpenAI]:
    settings = tiny_settings(model_dir, chat_template=DOCS_TEMPLATE, max_model_len=MAX_MODEL_LEN)
    with started_stack(settings) as shared, live_app(settings, shared) as srv, srv.openai() as c:
        yield c


def complete(client: openai.OpenAI, prompt: Any, **kw: Any) -> Any:
    return client.completions.create(model="tiny", prompt=prompt, temperature=0, **kw)


def chat(client: openai.OpenAI, messages: list[dict], **kw: Any) -> Any:
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)


def reference_chat_ids(vocab: Tokenizer, messages: list[dict], **kw: Any) -> list[int]:
    ref = PreTrainedTokenizerFast(tokenizer_object=vocab, bos_token=BOS, chat_template=DOCS_TEMPLATE)
    text = ref.apply_chat_template(messages, tokenize=False, **kw)
    return vocab.encode(text, add_special_tokens=False).ids


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, vocab) -> None:
    ids = vocab.encode(PROMPT, add_special_tokens=False).ids
    assert len(ids) > 8
    cut = complete(client, ids, max_tokens=6, echo=True, extra_body={"truncate_prompt_tokens": 5})
    same = complete(client, ids[-5:], max_tokens=6)
    assert cut.usage.prompt_tokens == 5 and cut.usage.completion_tokens == 6
    assert cut.choices[0].text == vocab.decode(ids[-5:], skip_special_tokens=False) + same.choices[0].text
    # a text prompt is cut after tokenizing (its BOS goes first); echo shows what the model saw
    text = complete(client, PROMPT, max_tokens=4, echo=True, extra_body={"truncate_prompt_tokens": 3})
    with_bos = vocab.encode(PROMPT).ids
    assert text.usage.prompt_tokens == 3
    assert text.choices[0].text.startswith(vocab.decode(with_bos[-3:], skip_special_tokens=False))
    # -1: the last tokens that leave room for max_tokens in the context
    long = ids * (MAX_MODEL_LEN // len(ids) + 1)
    fit = complete(client, long, max_tokens=10, extra_body={"truncate_prompt_tokens": -1})
    assert fit.usage.prompt_tokens == MAX_MODEL_LEN - 10
    assert (
        fit.choices[0].text == complete(client, long[-(MAX_MODEL_LEN - 10) :], max_tokens=10).choices[0].text
    )
    # a prompt shorter than k is untouched; chat is cut the same way
    assert complete(
        client, ids, max_tokens=1, extra_body={"truncate_prompt_tokens": 100}
    ).usage.prompt_tokens == len(ids)
    user = [{"role": "user", "content": PROMPT}]
    assert chat(client, user, max_tokens=1, extra_body={"truncate_prompt_tokens": 4}).usage.prompt_tokens == 4
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        complete(client, ids, max_tokens=1, extra_body={"truncate_prompt_tokens": 0})


def test_add_special_tokens(client, vocab) -> None:
    plain = vocab.encode(PROMPT, add_special_tokens=False).ids
    assert complete(client, PROMPT, max_tokens=1).usage.prompt_tokens == len(plain) + 1  # BOS by default
    off = complete(client, PROMPT, max_tokens=1, extra_body={"add_special_tokens": False})
    assert off.usage.prompt_tokens == len(plain)
    user = [{"role": "user", "content": "hi"}]
    templated = reference_chat_ids(vocab, user, add_generation_prompt=True)
    assert chat(client, user, max_tokens=1).usage.prompt_tokens == len(templated)  # chat: off by default
    on = chat(client, user, max_tokens=1, extra_body={"add_special_tokens": True})
    assert on.usage.prompt_tokens == len(templated) + 1


def test_continue_final_message_prompts_as_transformers_and_continues(client, vocab) -> None:
    messages = [
        {"role": "user", "content": "Say a colour."},
        {"role": "assistant", "content": "The colour is"},
    ]
    body = {"add_generation_prompt": False, "continue_final_message": True}
    expected = reference_chat_ids(vocab, messages, add_generation_prompt=False, continue_final_message=True)
    r = chat(client, messages, max_tokens=5, extra_body={**body, "echo": True})
    assert r.usage.prompt_tokens == len(expected)
    assert r.choices[0].message.role == "assistant"
    continued = complete(client, expected, max_tokens=5)  # the same prompt, as token ids
    assert r.choices[0].message.content == "The colour is" + continued.choices[0].text
    server = str(client.base_url).removesuffix("/").removesuffix("/v1")
    tokenized = httpx.post(server + "/tokenize", json={"model": "tiny", "messages": messages, **body}).json()
    assert tokenized["tokens"] == expected
    with pytest.raises(openai.BadRequestError, match="add_generation_prompt"):
        chat(client, messages, max_tokens=1, extra_body={"continue_final_message": True})


def test_documents_reach_the_chat_template(client, vocab) -> None:
    docs = [{"title": "a", "text": "Paris is in France."}, {"title": "b", "text": "Rome is in Italy."}]
    user = [{"role": "user", "content": "Where is Rome?"}]
    expected = reference_chat_ids(vocab, user, add_generation_prompt=True, documents=docs)
    assert chat(client, user, max_tokens=1, extra_body={"documents": docs}).usage.prompt_tokens == len(
        expected
    )
    assert len(expected) > len(reference_chat_ids(vocab, user, add_generation_prompt=True))


def test_return_tokens_as_token_ids_per_request(client, vocab) -> None:
    r = complete(client, PROMPT, max_tokens=4, logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    tokens = r.choices[0].logprobs.tokens
    assert all(t.startswith("token_id:") for t in tokens)
    ids = [int(t.removeprefix("token_id:")) for t in tokens]
    assert vocab.decode(ids, skip_special_tokens=False) == r.choices[0].text
    assert all(vocab.id_to_token(i) is not None for i in ids)
    plain = complete(client, PROMPT, max_tokens=4, logprobs=2)
    assert plain.choices[0].logprobs.tokens == [vocab.decode([i], skip_special_tokens=False) for i in ids]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_beam_search", True),
        ("allowed_token_ids", [1, 2]),
        ("bad_words", ["fox"]),
        ("logits_processors", ["my.module:Processor"]),
        ("prompt_embeds", "AAAA"),
        ("chat_template", "{{ messages }}"),
    ],
)
def test_fields_we_cannot_honour_are_refused_by_name(client, field: str, value: Any) -> None:
    calls = {
        "chat": lambda: chat(
            client, [{"role": "user", "content": "hi"}], max_tokens=1, extra_body={field: value}
        )
    }
    if field != "chat_template":  # a chat field: to completions it is an unknown one
        calls["completions"] = lambda: complete(client, "hi", max_tokens=1, extra_body={field: value})
    for call in calls.values():
        with pytest.raises(openai.BadRequestError) as e:
            call()
        error = e.value.body
        assert e.value.status_code == 400 and field in error["message"] and error.get("param") == field
    # off, they ask for what we do
    off = {"use_beam_search": False, "allowed_token_ids": None, "bad_words": []}
    assert chat(client, [{"role": "user", "content": "hi"}], max_tokens=1, extra_body=off).choices


def test_chat_still_names_unknown_fields(client) -> None:
    """The chat-template fields are shared with /tokenize through a base class: unknown fields
    must still be kept aside and named on both."""
    server = str(client.base_url).removesuffix("/").removesuffix("/v1")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temprature": 1}
    for path, extra in (("/v1/chat/completions", {"max_tokens": 1}), ("/tokenize", {})):
        r = httpx.post(server + path, json={**body, **extra}, timeout=30)
        assert r.status_code == 200 and r.headers["x-shardserve-ignored-fields"] == "temprature", path
