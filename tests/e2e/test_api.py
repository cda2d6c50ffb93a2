"""The HTTP API through the official openai client (sync and async), on a tiny random Llama.

References: transformers (greedy tokens and log-probabilities of the same weights, its tokenizer
and chat template) and the openai client itself, whose types parse our JSON and SSE. One server
per module: ranks are processes and cost seconds to start."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer, LlamaForCausalLM

from app.engine.types import GenerateRequest, RequestOutput, SamplingParams
from tests.support.api_server import live_app, started_stack, tiny_settings, wait_for
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(180)
USER = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir):
    # usage shows prefix-cache hits (test_prefix_cache_shows_in_usage), as vLLM's with this flag
    settings = tiny_settings(model_dir, enable_prompt_tokens_details=True)
    with started_stack(settings) as stack, live_app(settings, stack) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.openai() as c:
        yield c


@pytest.fixture(scope="module")
def hf(model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def hf_greedy(hf, ids: list[int], max_new: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation of ids, stopping at EOS, and the log-probs of each pick."""
    model, tok = hf
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    new = out.sequences[0, len(ids) :].tolist()
    logprobs = torch.stack([torch.log_softmax(s[0], -1)[t] for s, t in zip(out.scores, new, strict=True)])
    return new, logprobs


def test_models_lists_the_model_and_its_context(client, server) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [server.state.card.name]
    assert models[0].model_extra["max_model_len"] == 256


def test_chat_greedy_equals_transformers_with_logprobs(client, hf) -> None:
    # developer means system; text parts are joined by newlines
    ours = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]},
    ]
    ref = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is\n2+2?"}]
    ids = hf[1].apply_chat_template(ref, add_generation_prompt=True, tokenize=True, return_dict=False)
    new, ref_logprobs = hf_greedy(hf, ids, 12)
    r = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=ours, max_tokens=12, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.message.content == hf[1].decode(new, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if new[-1] == hf[1].eos_token_id else "length")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(new)
    entries = choice.logprobs.content
    emitted = [e for e, t in zip(entries, new, strict=False) if t != hf[1].eos_token_id]
    # each token's own bytes (a random model emits stray pieces of characters, U+FFFD in the text)
    assert b"".join(bytes(e.bytes) for e in emitted).decode(errors="replace") == choice.message.content
    ours_lp = torch.tensor([e.logprob for e in entries])
    assert torch.allclose(ours_lp, ref_logprobs[: len(entries)], atol=1e-3)
    for e in entries:  # greedy: the pick is the likeliest of the tops
        assert len(e.top_logprobs) == 3 and e.logprob == pytest.approx(max(t.logprob for t in e.top_logprobs))


def test_completions_greedy_equals_transformers_for_text_ids_and_echo(client, hf) -> None:
    prompt = "The quick brown fox"
    ids = hf[1].encode(prompt)
    new, _ = hf_greedy(hf, ids, 10)
    expected = hf[1].decode(new, skip_special_tokens=True)
    by_text = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, echo=True)
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    assert echoed.choices[0].text == prompt + expected
    assert by_text.usage.prompt_tokens == len(ids)


def test_completions_default_max_tokens_is_16_and_logprobs_shape(client) -> None:
    r = client.completions.create(
        model="tiny", prompt="Count with me:", temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert r.usage.completion_tokens == 16 and len(lp.tokens) == 16
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(16)]
    assert all(
        1 <= len(top) <= 2 and max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_greedy_text_equals_whole_text(client, kind: str) -> None:
    if kind == "chat":
        whole = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=0)
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=USER, max_tokens=24, temperature=0, stream=True
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        expected, finish = whole.choices[0].message.content, whole.choices[0].finish_reason
    else:
        whole = client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0
        )
        chunks = list(
            client.completions.create(
                model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0, stream=True
            )
        )
        text = "".join(c.choices[0].text for c in chunks)
        expected, finish = whole.choices[0].text, whole.choices[0].finish_reason
    assert text == expected and len(text) > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [finish]
    assert len({c.id for c in chunks}) == 1


def test_n_choices_interleave_and_usage_counts_the_prompt_once(client) -> None:
    kw = dict(model="tiny", messages=USER, max_tokens=12, temperature=1.0, seed=7, n=3, logprobs=True)
    whole = client.chat.completions.create(**kw)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2]
    assert whole.usage.completion_tokens == sum(len(c.logprobs.content) for c in whole.choices)
    single = client.chat.completions.create(**{**kw, "n": 1})
    assert whole.usage.prompt_tokens == single.usage.prompt_tokens
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    order = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.content]
    assert order != sorted(order), "choices should interleave in the stream"
    texts = {
        i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(3)
    }
    assert texts == {c.index: c.message.content for c in whole.choices}  # seeded: same tokens either way
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_several_prompts_give_prompt_major_choice_indices(client) -> None:
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in ("Hello", "Paris")
    ]
    r = client.completions.create(model="tiny", prompt=["Hello", "Paris"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        alone[0],
        alone[0],
        alone[1],
        alone[1],
    ]


def test_stop_strings_cut_before_the_stop(client) -> None:
    base = dict(model="tiny", messages=USER, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**base).choices[0].message.content
    stop = full[4:7]
    cut = full.find(stop)
    r = client.chat.completions.create(**base, stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (full[:cut], "stop")
    kept = client.chat.completions.create(
        **{**base, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}}, stop=stop
    )
    assert kept.choices[0].message.content == full[: cut + len(stop)]
    streamed = client.chat.completions.create(**base, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[:cut]


def test_seed_makes_sampling_reproducible(client) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(
            model="tiny",
            prompt="Hello",
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_prefix_cache_shows_in_usage(client) -> None:
    long_user = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 4}]
    first = client.chat.completions.create(model="tiny", messages=long_user, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model="tiny", messages=long_user, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 32
    assert again.usage.prompt_tokens_details.cached_tokens >= 32  # two full 16-token blocks at least


def test_async_client_concurrent_streams_equal_their_whole_answers(server) -> None:
    prompts = ["Hello", "What is the capital of France?", "def forward(self, x):", "Café"]

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as ac:

            async def chat_stream(text: str) -> str:
                stream = await ac.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": text}],
                    max_tokens=16,
                    temperature=0,
                    stream=True,
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            async def whole(text: str) -> str:
                r = await ac.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0
                )
                return r.choices[0].message.content

            expected = [await whole(t) for t in prompts]  # one at a time
            got = await asyncio.gather(*(chat_stream(t) for t in prompts))  # batched together
            assert list(got) == expected
            comp = await ac.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
            assert comp.choices[0].text and comp.usage.completion_tokens >= 1

    asyncio.run(run())


def test_timeout_keeps_partial_output(client) -> None:
    # 4 choices of 250 tokens take 250 batched steps: well over 0.1 s even on a fast machine
    stream = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=250, temperature=0, n=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "timeout": 0.1},
    )  # fmt: skip
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["timeout"] * 4
    assert chunks[-1].usage.completion_tokens < 4 * 250
    streamed = sum(1 for c in chunks if c.choices and c.choices[0].text)
    assert (streamed > 0) == (chunks[-1].usage.completion_tokens > 0)  # what was made went out


def test_tokenize_and_detokenize_match_transformers(server, hf) -> None:
    tok = hf[1]
    text = "Café, naïve! 日本語 🙂"
    with httpx.Client(base_url=server.url) as h:
        r = h.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
        assert (
            r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
        )
        assert len(r["token_strs"]) == r["count"]
        m = h.post("/tokenize", json={"messages": USER}).json()
        assert m["tokens"] == tok.apply_chat_template(
            USER, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        d = h.post("/detokenize", json={"tokens": m["tokens"]}).json()
        assert d == {"prompt": tok.decode(m["tokens"], skip_special_tokens=False)}


def test_request_id_is_echoed_and_logged(server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="shardserve.access")
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url) as h:
        r = h.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42"})
        assert r.headers["x-request-id"] == "trace-42"
        made = h.get("/version").headers["x-request-id"]
        assert len(made) == 32 and made != "trace-42"
        assert (
            h.get("/health", headers={"X-Request-Id": "bad id\x7f"}).headers["x-request-id"] != "bad id\x7f"
        )

    def line() -> dict | None:
        for rec in caplog.records:
            if rec.name == "shardserve.access" and '"trace-42"' in rec.getMessage():
                return json.loads(rec.getMessage())
        return None

    assert wait_for(lambda: line() is not None)
    entry = line()
    assert entry["status"] == 200 and entry["path"] == "/v1/completions" and entry["finish"] == "length"
    assert entry["prompt_tokens"] == r.json()["usage"]["prompt_tokens"] and entry["completion_tokens"] == 4
    assert 0 <= entry["queue_s"] < entry["ttft_s"] <= entry["total_s"]
    assert "Hello" not in caplog.text  # prompts never reach the logs


def test_probes_version_metrics_and_playground(server) -> None:
    with httpx.Client(base_url=server.url) as h:
        assert h.get("/health").json() == {"status": "ok"}
        assert h.get("/ready").json() == {"status": "ready"}
        assert h.get("/version").json()["version"]
        m = h.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain; version=")
        names = {f.name for f in text_string_to_metric_families(m.text)}
        assert {"shardserve_requests_running", "shardserve_time_to_first_token_seconds"} <= names
        page = h.get("/")
        assert (
            page.status_code == 200 and "text/html" in page.headers["content-type"] and "<script" in page.text
        )


def test_default_model_chat_over_http_equals_the_engine(default_model_path) -> None:
    """The real model, greedy: the HTTP path (template, tokenization, params) gives what the
    engine gives for `shardserve generate --chat`'s request."""
    # no prefix cache: the HTTP request must prefill exactly as the direct one did
    settings = tiny_settings(
        default_model_path,
        kv_cache_tokens=512,
        max_model_len=512,
        max_num_seqs=2,
        enable_prefix_caching=False,
    )
    prompt = "What is 2+2?"
    with started_stack(settings) as stack:
        outputs: queue.SimpleQueue[list[RequestOutput]] = queue.SimpleQueue()
        stack.deliver_to(outputs.put)
        tok = stack.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tuple(tok.encode(text, add_special_tokens=False))
        params = SamplingParams(temperature=0.0, max_tokens=8)  # few tokens: a step costs 0.1-2 s here
        stack.engine.add_request(GenerateRequest("direct", ids, params, time.monotonic()))
        direct, done = "", False
        while not done:
            for out in outputs.get(timeout=120):
                direct += out.text
                done = done or out.finish_reason is not None
        with (
            live_app(settings, stack) as srv,
            srv.openai(api_key="x") as c,
        ):
            r = c.chat.completions.create(
                model=stack.model_name,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=8,
                temperature=0,
            )
    assert r.choices[0].message.content == direct and len(direct) > 8


def test_log_prompts_puts_prompts_and_outputs_in_the_access_log(server, caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="shardserve.access")
    monkeypatch.setattr(server.state.settings, "log_prompts", True)
    body = {"model": "tiny", "prompt": "Paris", "max_tokens": 3, "temperature": 0, "n": 2}
    with httpx.Client(base_url=server.url) as h:
        r = h.post("/v1/completions", json=body, headers={"X-Request-Id": "logged-1"}).json()

    def line() -> dict | None:
        msgs = [rec.getMessage() for rec in caplog.records if rec.name == "shardserve.access"]
        return next((json.loads(m) for m in msgs if '"logged-1"' in m), None)

    assert wait_for(lambda: line() is not None)
    assert line()["prompts"] == ["Paris"]
    assert line()["outputs"] == [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
