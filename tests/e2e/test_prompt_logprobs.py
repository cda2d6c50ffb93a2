"""Evaluation-ready logprobs on a tiny random Llama, through the official openai client: echo with
logprobs (max_tokens 0 and 1, as lm-evaluation-harness sends them), vLLM's prompt_logprobs on both
endpoints, the prefix cache bypassed for scored prompts, batched equal to alone, each token's own
bytes, and /tokenizer_info as lm-evaluation-harness's remote tokenizer reads it.

References: transformers' LlamaForCausalLM on the same weights (log_softmax of its logits), the
`tokenizers` library's vocabulary with transformers' GPT-2 byte map for token bytes, and lm-eval's
own RemoteTokenizer."""

from __future__ import annotations

import asyncio
import logging

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests.support.api_server import live_app, started_stack, tiny_settings
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(180)
PROMPT = "The quick brown fox jumps over the lazy dog. Count with me: 0 1 2 3"
TOL = 1e-4  # fp32 against transformers' fp32: different kernels, same arithmetic up to rounding


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir):
    # block_size 16 and a small step budget: long prompts are chunked and fill whole cache blocks
    # usage shows prefix-cache hits: scored prompts bypass the cache (vLLM's flag for them)
    settings = tiny_settings(model_dir, max_num_batched_tokens=32, enable_prompt_tokens_details=True)
    with started_stack(settings) as stack, live_app(settings, stack) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.openai() as c:
        yield c


@pytest.fixture(scope="module")
def hf(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vocab(model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def reference(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities [len(ids) - 1, vocab]: row i scores ids[i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def ids_of(vocab: Tokenizer, text: str) -> list[int]:
    return vocab.encode(text, add_special_tokens=False).ids


def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt_as_transformers(client, hf, vocab) -> None:
    ids = ids_of(vocab, PROMPT)
    r = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [vocab.decode([i], skip_special_tokens=False) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # as OpenAI's legacy API
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(PROMPT) - len(lp.tokens[-1])
    ref = reference(hf, ids)
    want = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=TOL)
    for row, top in zip(ref, lp.top_logprobs[1:], strict=True):
        vals, top_ids = row.topk(2)
        texts = [vocab.decode([i], skip_special_tokens=False) for i in top_ids.tolist()]
        assert set(top) == set(texts)  # keyed by text: two ids of one text keep the likelier
        assert [top[t] for t in texts] == pytest.approx([vals[texts.index(t)].item() for t in texts], abs=TOL)


def test_echo_as_lm_eval_sends_it_batched_token_ids_and_one_token(client, hf, vocab) -> None:
    """lm-eval's local-completions: token-id prompts in a batch, echo, logprobs 1, max_tokens 1, and
    it reads token_logprobs[ctxlen:-1] (the last entry is the generated token)."""
    prompts = [ids_of(vocab, t) for t in ("Paris is the capital of France.", "Hello, world! How are you")]
    r = client.completions.create(
        model="tiny", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234
    )
    for choice, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts, strict=True):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1
        ref = reference(hf, ids)
        want = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp.token_logprobs[1:-1]), want, atol=TOL)
        greedy = [
            t == max(top.values())
            for t, top in zip(lp.token_logprobs[1:-1], lp.top_logprobs[1:-1], strict=True)
        ]
        assert greedy == (ref.argmax(-1) == torch.tensor(ids[1:])).tolist()  # lm-eval's is_greedy


def test_prompt_logprobs_field_has_vllm_shape_and_ranks(client, hf, vocab) -> None:
    ids = ids_of(vocab, PROMPT)
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": 3}
    )
    shown = r.choices[0].model_extra["prompt_logprobs"]
    assert len(shown) == len(ids) and shown[0] is None
    ref = reference(hf, ids)
    for pos, entry in enumerate(shown[1:], start=1):
        row, token = ref[pos - 1], ids[pos]
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(float(row[token]), abs=TOL)
        assert mine["rank"] == int((row > row[token]).sum()) + 1
        assert mine["decoded_token"] == vocab.decode([token], skip_special_tokens=False)
        top = row.topk(3).indices.tolist()
        assert {str(t) for t in top} <= set(entry) and len(entry) in (3, 4)
        assert [entry[str(t)]["rank"] for t in top] == [1, 2, 3]
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=1,
        extra_body={"prompt_logprobs": 0},
    )
    shown = chat.model_extra["prompt_logprobs"]
    assert shown[0] is None and all(len(e) == 1 for e in shown[1:]) and len(shown) == chat.usage.prompt_tokens


def test_cached_prefix_is_computed_again_for_a_scored_prompt(client, hf, vocab) -> None:
    text = PROMPT + " and a long tail so that several whole cache blocks of sixteen tokens hold it"
    ids = ids_of(vocab, text)
    client.completions.create(model="tiny", prompt=text, max_tokens=1)  # fills the prefix cache
    plain = client.completions.create(model="tiny", prompt=text, max_tokens=1)
    assert plain.usage.prompt_tokens_details.cached_tokens >= 32  # the cache serves it
    r = client.completions.create(model="tiny", prompt=text, echo=True, logprobs=0, max_tokens=0)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    want = reference(hf, ids).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(r.choices[0].logprobs.token_logprobs[1:]), want, atol=TOL)


def test_prompt_logprobs_batched_equal_alone(server, vocab) -> None:
    texts = [PROMPT, "Hello, world! How are you today?", "def forward(self, x): return x", PROMPT[:20]]
    body = {"model": "tiny", "echo": True, "logprobs": 3, "max_tokens": 3, "temperature": 0}

    async def one(ac: openai.AsyncOpenAI, text: str) -> list:
        r = await ac.completions.create(prompt=text, extra_body={"prompt_logprobs": 2}, **body)
        return [r.choices[0].logprobs.model_dump(), r.choices[0].model_extra["prompt_logprobs"]]

    async def run() -> tuple[list, list]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as ac:
            alone = [await one(ac, t) for t in texts]
            together = await asyncio.gather(*(one(ac, t) for t in texts))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone  # bitwise: the same floats, not merely close


def test_token_bytes_are_each_tokens_own_also_inside_a_character(client, vocab) -> None:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}  # transformers' GPT-2 byte map
    raw = {i: bytes(byte_of[c] for c in vocab.id_to_token(i)) for i in range(256, vocab.get_vocab_size())}
    partial = next(
        i for i, b in sorted(raw.items()) if _is_partial_utf8(b) and not vocab.id_to_token(i).startswith("<")
    )
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2, logit_bias={str(partial): 100},
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert [t.bytes for t in content] == [list(raw[partial])] * 3  # not U+FFFD's [239, 191, 189]
    for t in content:
        for alt in t.top_logprobs:
            ids = vocab.token_to_id(alt.token)
            if ids is not None and ids >= 256:
                assert alt.bytes == list(raw[ids])
    # a free output: its tokens' bytes join to the text's UTF-8
    free = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Café 🙂"}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
    )
    joined = b"".join(bytes(t.bytes) for t in free.choices[0].logprobs.content)
    assert joined.decode("utf-8", errors="replace") == free.choices[0].message.content


def _is_partial_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": "Hi", "max_tokens": 0}, "needs echo or prompt_logprobs"),
        ({"prompt": "Hi", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": "Hi", "prompt_logprobs": 1, "stream": True}, "not available with stream"),
        ({"prompt": "Hi", "echo": True, "logprobs": 1, "stream": True}, "not available with stream"),
        ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_scoring_requests_are_400(server, body, words) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(server, model_dir, vocab) -> None:
    from lm_eval.utils import RemoteTokenizer

    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
    assert info["chat_template"] and info["added_tokens_decoder"]["0"] == "<|endoftext|>"
    remote = RemoteTokenizer(server.url + "/v1/completions")
    assert remote.eos_token_id == vocab.token_to_id("<|im_end|>")
    assert remote.encode(PROMPT) == ids_of(vocab, PROMPT)
    assert remote.decode(ids_of(vocab, PROMPT)) == PROMPT


def test_unknown_fields_are_named_in_a_header_and_logged_once(server, caplog) -> None:
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1, "max_token": 5, "temprature": 0.1}
    with caplog.at_level(logging.WARNING, logger="shardserve.api"):
        first = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        again = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        bad = httpx.post(server.url + "/v1/completions", json={**body, "n": 99, "x\n\u00e9": 1}, timeout=30)
    assert first.status_code == again.status_code == 200 and bad.status_code == 400
    assert first.headers["x-shardserve-ignored-fields"] == "max_token, temprature"
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        assert s.headers["x-shardserve-ignored-fields"] == "max_token, temprature"  # streams say it too
        assert list(s.iter_lines())[-2] == "data: [DONE]"
    assert again.headers["x-shardserve-ignored-fields"] == "max_token, temprature"
    assert (
        "x-shardserve-ignored-fields"
        not in httpx.post(
            server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=30
        ).headers
    )
    odd = httpx.post(
        server.url + "/tokenize", json={"prompt": "Hi", "na\u00efve\r\nX-Evil: 1": 1}, timeout=30
    )
    assert odd.headers["x-shardserve-ignored-fields"] == "na\\u00efve\\r\\nX-Evil: 1"  # escaped: one header
    assert "x-evil" not in odd.headers
    warned = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert warned == [
        "The following fields were present in the request but ignored: max_token, temprature",
        "The following fields were present in the request but ignored: na\\u00efve\\r\\nX-Evil: 1",
    ]
