"""OpenAI request validation, SamplingParams mapping, model checks and response shapes.

References: the official openai client (the JSON it sends must validate; our responses must
validate as its types) and the limits documented in app/api/protocol.py.
"""

from __future__ import annotations

import json
import logging
import math

import httpx2
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from app.api import errors
from app.api import messages as m
from app.api import protocol as p
from app.api import responses as r
from app.api.errors import ContextTooLong, InvalidRequest, from_validation_error
from app.api.prepare import sampling_params
from app.engine.types import SamplingParams, TokenLogprob

PROMPT = {"prompt": "hello"}
MSGS = {"messages": [{"role": "user", "content": "hi"}]}


def rejected(cls: type, body: dict) -> InvalidRequest:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    err = from_validation_error(info.value)
    assert err.status_code == 400 and err.error_type == "invalid_request_error"
    return err


# (field, bad value, an accepted boundary value or None) for both endpoints
SHARED_BOUNDS = [
    ("n", 0, 1),
    ("n", p.MAX_N + 1, p.MAX_N),
    ("n", 1.0, None),
    ("n", True, None),
    ("temperature", -0.01, 0),
    ("temperature", 2.01, 2),
    ("temperature", "0.5", None),
    ("temperature", math.nan, None),
    ("temperature", math.inf, None),
    ("top_p", 0, 1e-9),
    ("top_p", 1.01, 1),
    ("top_k", -2, -1),
    ("min_p", -0.1, 0),
    ("min_p", 1.1, 1),
    ("presence_penalty", -2.01, -2),
    ("presence_penalty", 2.01, 2),
    ("frequency_penalty", -2.01, -2),
    ("frequency_penalty", 2.01, 2),
    ("repetition_penalty", 0, 1e-3),
    ("repetition_penalty", 2.01, 2),
    ("max_tokens", 0, 1),
    ("max_tokens", 1.5, None),
    ("seed", 2**63, 2**63 - 1),
    ("seed", -(2**63) - 1, -(2**63)),
    ("priority", 2**63, -5),
    ("timeout", 0, 0.001),
    ("timeout", -1, None),
    ("min_tokens", -1, 0),
    ("stream", "true", True),
    ("ignore_eos", 1, False),
    ("user", 5, "u"),
    ("stop", [""], ["x"]),
    ("stop", ["x" * (p.MAX_STOP_LEN + 1)], ["x" * p.MAX_STOP_LEN]),
    ("stop", ["s"] * (p.MAX_STOP + 1), ["s"] * p.MAX_STOP),
    ("stop", 5, "\n"),
    ("stop", ["a", 1], None),
    ("stop_token_ids", [-1], [0]),
    ("stop_token_ids", [1] * (p.MAX_STOP_TOKEN_IDS + 1), [1] * p.MAX_STOP_TOKEN_IDS),
    ("logit_bias", {"1": 100.5}, {"1": 100}),
    ("logit_bias", {"1": -100.5}, {"1": -100}),
    ("logit_bias", {"a": 1}, None),
    ("logit_bias", {"-1": 1}, None),
    ("logit_bias", {"1.5": 1}, None),
    (
        "logit_bias",
        {str(i): 1 for i in range(p.MAX_LOGIT_BIAS + 1)},
        {str(i): 1 for i in range(p.MAX_LOGIT_BIAS)},
    ),
    ("logit_bias", {"1": math.nan}, None),
    ("stream_options", {"include_usage": True}, None),  # without stream
]


@pytest.mark.parametrize("cls,base", [(p.CompletionRequest, PROMPT), (p.ChatCompletionRequest, MSGS)])
@pytest.mark.parametrize("field,bad,good", SHARED_BOUNDS)
def test_shared_bounds(cls: type, base: dict, field: str, bad: object, good: object) -> None:
    err = rejected(cls, {**base, field: bad})
    assert err.param is not None and err.param.split("[")[0].split(".")[0] == field, err.message
    assert field in err.message
    if good is not None:
        cls.model_validate({**base, field: good})


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "suffix": "tail"}, "suffix"),
        ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
        ({"prompt": "x", "n": 2, "best_of": 1}, "best_of"),
        ({"prompt": "x", "stream": True, "prompt_logprobs": 0}, "prompt_logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [[1], "a"]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [2**31]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": ["a"] * (p.MAX_PROMPTS + 1)}, "prompt"),
        ({"prompt": [1] * (p.MAX_PROMPT_TOKEN_IDS + 1)}, "prompt"),
        ({"prompt": [[1] * 70000, [1] * 70000]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_completion_rejects(body: dict, param: str) -> None:
    assert rejected(p.CompletionRequest, body).param == param


def test_completion_accepts_limits() -> None:
    p.CompletionRequest.model_validate({"prompt": "x", "logprobs": 5, "n": 3, "best_of": 3, "suffix": ""})
    p.CompletionRequest.model_validate({"prompt": [1] * p.MAX_PROMPT_TOKEN_IDS})
    p.CompletionRequest.model_validate({"prompt": ["a"] * p.MAX_PROMPTS, "echo": True})


def test_missing_parameter_message() -> None:
    assert rejected(p.CompletionRequest, {}).message == "Missing required parameter: 'prompt'."


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_forms(prompt: object, expected: list) -> None:
    assert p.CompletionRequest.model_validate({"prompt": prompt}).prompt_list() == expected


def msgs(*messages: dict) -> dict:
    return {"messages": list(messages)}


@pytest.mark.parametrize(
    "body,param,text",
    [
        (msgs(), "messages", "at least 1"),
        ({"messages": [{"role": "user", "content": "x"}] * (p.MAX_MESSAGES + 1)}, "messages", "at most"),
        (
            msgs({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}),
            "messages[0].content",
            "only text content is supported",
        ),
        (
            msgs({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}),
            "messages[0].content",
            "only text content is supported",
        ),
        (msgs({"role": "user", "content": []}), "messages[0].content", "empty"),
        (msgs({"role": "user", "content": [{"type": "text"}]}), "messages[0].content[0].text", "Missing"),
        (msgs({"role": "function", "content": "x"}), "messages[0].role", "'developer'"),
        (msgs({"role": "user"}), "messages[0]", "needs content"),
        (msgs({"role": "user", "content": 5}), "messages[0].content", ""),
        ({"messages": "hi"}, "messages", ""),
        ({**MSGS, "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
        ({**MSGS, "max_completion_tokens": 0}, "max_completion_tokens", ""),
        ({**MSGS, "logprobs": 1}, "logprobs", ""),
        ({**MSGS, "response_format": {"type": "xml"}}, "response_format.type", ""),
        ({**MSGS, "tool_choice": "sometimes"}, "tool_choice", ""),
        ({**MSGS, "tools": [{"type": "function"}]}, "tools[0].function", "Missing"),
    ],
)
def test_chat_rejects(body: dict, param: str, text: str) -> None:
    err = rejected(p.ChatCompletionRequest, body)
    assert err.param == param and text in err.message, err.message


def test_chat_accepts_roles_parts_and_tools() -> None:
    req = p.ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "logprobs": True,
            "top_logprobs": 20,
            "tool_choice": "auto",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            },
        }
    )
    assert req.response_format is not None and req.response_format.json_schema is not None
    assert req.response_format.json_schema.json_schema == {"type": "object"}
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]


def test_unknown_fields_ignored_and_null_means_default() -> None:
    req = p.CompletionRequest.model_validate(
        {
            "prompt": "x",
            "frobnicate": {"deep": [1]},
            "logit_bias": None,
            "stop": None,
            "n": None,
            "stream": None,
            "metadata": {"a": "b"},
            "store": True,
        }
    )
    assert req.n == 1 and req.stream is False and req.stop is None
    assert req.model_extra == {"frobnicate": {"deep": [1]}, "metadata": {"a": "b"}, "store": True}
    chat = p.ChatCompletionRequest.model_validate({**MSGS, "service_tier": "auto", "modalities": ["text"]})
    assert chat.messages[0].content == "hi"


def test_requests_are_immutable() -> None:
    req = p.CompletionRequest.model_validate(PROMPT)
    with pytest.raises(ValidationError):
        req.n = 3  # type: ignore[misc]


def test_what_the_openai_client_sends_validates() -> None:
    """Every documented parameter, as the official client serializes it, is accepted."""
    bodies: list[dict] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        bodies.append(json.loads(request.content))
        return httpx2.Response(
            400, json={"error": {"message": "stop", "type": "x", "param": None, "code": None}}
        )

    client = openai.OpenAI(
        base_url="http://t/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    extra = {
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "priority": 1,
        "stop_token_ids": [2],
        "min_tokens": 1,
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
        "timeout": 30.0,
    }
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model="m",
            prompt=[1, 2],
            max_tokens=8,
            temperature=0.5,
            top_p=0.9,
            n=2,
            best_of=2,
            stream=False,
            stop=["\n"],
            seed=7,
            presence_penalty=0.1,
            frequency_penalty=0.2,
            logit_bias={"5": -100},
            logprobs=3,
            echo=False,
            user="u",
            extra_body=extra,
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="m",
            messages=[{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}],
            max_completion_tokens=8,
            max_tokens=8,
            temperature=0,
            top_p=1,
            n=1,
            stream=True,
            stream_options={"include_usage": True},
            stop="x",
            seed=1,
            presence_penalty=0,
            frequency_penalty=0,
            logit_bias={"1": 1},
            logprobs=True,
            top_logprobs=2,
            user="u",
            response_format={"type": "text"},
            parallel_tool_calls=False,
            tool_choice="none",
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            extra_body={
                **extra,
                "echo": False,
                "add_generation_prompt": True,
                "chat_template_kwargs": {"enable_thinking": False},
            },
        )
    completion, chat = (
        p.CompletionRequest.model_validate(bodies[0]),
        p.ChatCompletionRequest.model_validate(bodies[1]),
    )
    assert completion.logprobs == 3 and completion.timeout == 30.0 and chat.top_logprobs == 2
    assert chat.stream_options is not None and chat.stream_options.include_usage


# ---- sampling_params: sampling and max_tokens decided once, checked against the model -----------


def sampling(
    req: p.SamplingRequest,
    prompt: list[int] | int = 1,
    *,
    max_model_len: int = 10**6,
    vocab_size: int = 10**6,
    generation_defaults: dict | None = None,
    default_max_tokens: int = 100,
    max_logprobs: int = 20,
    **kw: object,
) -> SamplingParams:
    ids = list(range(prompt)) if isinstance(prompt, int) else prompt
    return sampling_params(
        req,
        ids,
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        generation_defaults=generation_defaults or {},
        default_max_tokens=default_max_tokens,
        max_logprobs=max_logprobs,
        **kw,  # type: ignore[arg-type]
    )


def test_sampling_params_maps_every_field() -> None:
    req = p.CompletionRequest.model_validate(
        {
            "prompt": "x",
            "max_tokens": 9,
            "temperature": 0.5,
            "top_p": 0.8,
            "n": 2,
            "stop": "END",
            "seed": -3,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "logit_bias": {"30": 1, "4": -100},
            "logprobs": 2,
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "stop_token_ids": [7, 8],
            "min_tokens": 3,
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
        }
    )
    assert sampling(req, generation_defaults={"temperature": 0.1}) == (
        SamplingParams(
            temperature=0.5,
            top_p=0.8,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logit_bias=((4, -100.0), (30, 1.0)),
            seed=-3,
            n=2,
            max_tokens=9,
            min_tokens=3,
            stop=("END",),
            stop_token_ids=(7, 8),
            ignore_eos=True,
            logprobs=2,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
        )
    )


def test_defaults_come_from_generation_config_then_openai() -> None:
    req = p.CompletionRequest.model_validate({"prompt": "x", "top_k": -1})
    gen = {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1, "max_tokens": 50}
    sp = sampling(req, generation_defaults=gen)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty) == (0.6, 0.9, 0, 1.1)
    assert sp.max_tokens == 50
    sp = sampling(req, default_max_tokens=30)
    assert sp == SamplingParams(max_tokens=30)


@pytest.mark.parametrize(
    "body,expected",
    [
        ({}, None),
        ({"logprobs": 0}, 0),
        ({"logprobs": 5}, 5),
    ],
)
def test_completions_logprobs_semantics(body: dict, expected: int | None) -> None:
    req = p.CompletionRequest.model_validate({"prompt": "x", **body})
    assert sampling(req, default_max_tokens=4).logprobs == expected


@pytest.mark.parametrize(
    "body,expected",
    [
        ({}, None),
        ({"logprobs": False}, None),
        ({"logprobs": False, "top_logprobs": 0}, None),
        ({"logprobs": True}, 0),
        ({"logprobs": True, "top_logprobs": 20}, 20),
    ],
)
def test_chat_logprobs_semantics(body: dict, expected: int | None) -> None:
    req = p.ChatCompletionRequest.model_validate({**MSGS, **body})
    assert sampling(req, default_max_tokens=4).logprobs == expected


def test_chat_max_completion_tokens_wins() -> None:
    req = p.ChatCompletionRequest.model_validate({**MSGS, "max_tokens": 5, "max_completion_tokens": 7})
    assert req.requested_max_tokens == 7
    assert sampling(req, default_max_tokens=99).max_tokens == 7
    req = p.ChatCompletionRequest.model_validate({**MSGS, "max_tokens": 5})
    assert sampling(req, default_max_tokens=99).max_tokens == 5


def test_min_tokens_above_max_tokens_is_refused() -> None:
    req = p.CompletionRequest.model_validate({"prompt": "x", "max_tokens": 2, "min_tokens": 3})
    with pytest.raises(InvalidRequest) as info:
        sampling(req, default_max_tokens=9)
    assert info.value.param == "min_tokens"


def completion(**body: object) -> p.CompletionRequest:
    return p.CompletionRequest.model_validate({"prompt": "x", **body})


def check(req: p.SamplingRequest, prompt: list[int] | int, **kw: object) -> SamplingParams:
    return sampling(req, prompt, vocab_size=100, max_model_len=64, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body,kw,param",
    [
        ({"stop_token_ids": [100]}, {}, "stop_token_ids"),
        ({"logit_bias": {"3": 1.0, "100": 1.0}}, {}, "logit_bias"),
        ({}, {"check_prompt_ids": True}, "prompt"),
    ],
)
def test_ids_outside_vocab(body: dict, kw: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check(completion(**body), [1, 100, 2], **kw)
    assert info.value.param == param and "100" in info.value.message


def chat(**body: object) -> p.ChatCompletionRequest:
    return p.ChatCompletionRequest.model_validate({**MSGS, **body})


@pytest.mark.parametrize(
    "req,param",
    [
        (lambda k: completion(logprobs=k), "logprobs"),
        (lambda k: completion(echo=True, logprobs=k, max_tokens=0), "logprobs"),  # scores the prompt with k
        (lambda k: completion(prompt_logprobs=k), "prompt_logprobs"),
        (lambda k: chat(logprobs=True, top_logprobs=k), "top_logprobs"),
        (lambda k: chat(prompt_logprobs=k), "prompt_logprobs"),
    ],
)
@pytest.mark.parametrize("limit", [0, 7, -1])
def test_max_logprobs_bounds_every_logprobs_field(req, param: str, limit: int) -> None:
    top = 100 if limit == -1 else limit  # -1: the vocabulary (check() serves 100 tokens)
    check(req(top), 1, max_logprobs=limit)
    with pytest.raises(InvalidRequest) as info:
        check(req(top + 1), 1, max_logprobs=limit)
    assert info.value.param == param and info.value.status_code == 400
    assert f"{param} of {top + 1}" in info.value.message and f"max allowed: {top}" in info.value.message


def test_ids_inside_vocab_pass() -> None:
    req = completion(stop_token_ids=[99], logit_bias={"99": 1.0}, max_tokens=4)
    sp = check(req, [0, 99], check_prompt_ids=True)
    assert (sp.stop_token_ids, sp.logit_bias, sp.max_tokens) == ((99,), ((99, 1.0),), 4)


def test_context_limits_are_openai_worded() -> None:
    with pytest.raises(ContextTooLong) as info:
        check(completion(max_tokens=10), 60)
    assert info.value.message == (
        "This model's maximum context length is 64 tokens. However, you requested 70 tokens "
        "(60 in the prompt, 10 in the completion). Please reduce the length of the prompt or completion."
    )
    assert (info.value.status_code, info.value.code, info.value.param) == (
        400,
        "context_length_exceeded",
        "prompt",
    )
    with pytest.raises(ContextTooLong) as info:
        check(p.ChatCompletionRequest.model_validate(MSGS), 64, noun="messages")
    assert "However, your messages resulted in 64 tokens" in info.value.message
    assert info.value.param == "messages"
    with pytest.raises(InvalidRequest, match="empty"):
        check(completion(), 0)


def test_defaulted_max_tokens_is_clipped_to_the_room_left() -> None:
    assert check(completion(), 60, default_max_tokens=1000).max_tokens == 4
    assert check(completion(max_tokens=4), 60).max_tokens == 4  # exactly fits
    with pytest.raises(InvalidRequest) as info:  # min_tokens no longer fits once clipped
        check(completion(min_tokens=10), 60, default_max_tokens=1000)
    assert info.value.param == "min_tokens"


# ---- responses: validated by the openai client's own types ------------------------------------------


def test_chat_response_validates_as_openai_types() -> None:
    top = ((5, "Hi", -0.5), (6, "\ufffd", -math.inf))
    lp = [TokenLogprob(5, "Hi", -0.5, top, bytes=b"Hi", top_bytes=(b"Hi", b"\xe2\x80"))]
    resp = r.ChatCompletionResponse(
        model="m",
        usage=r.UsageInfo.of(3, 1, cached_tokens=2),
        choices=[
            r.ChatChoice(
                index=0,
                message=r.ChatMessage(content="Hi"),
                finish_reason="stop",
                logprobs=r.chat_logprobs(lp),
            )
        ],
    )
    data = json.loads(resp.model_dump_json())
    parsed = ChatCompletion.model_validate(data)
    assert parsed.id.startswith("chatcmpl-") and parsed.object == "chat.completion"
    assert parsed.usage is not None and parsed.usage.total_tokens == 4
    details = parsed.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 2
    content = parsed.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and content[0].bytes == list(b"Hi")
    assert content[0].top_logprobs[1].bytes == [0xE2, 0x80] and content[0].top_logprobs[1].logprob == -9999.0
    assert data["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0] == {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": [72, 105],
    }


def test_chat_tool_call_message_keeps_null_content() -> None:
    msg = r.ChatMessage(
        content=None, tool_calls=[m.ToolCall(id="c", function=m.FunctionCall(name="f", arguments="{}"))]
    )
    data = json.loads(r.ChatChoice(index=0, message=msg, finish_reason="tool_calls").model_dump_json())
    assert data["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert data["logprobs"] is None


def test_completion_response_and_logprobs() -> None:
    lp = [
        TokenLogprob(1, " a", -0.1, ((1, " a", -0.1), (2, " b", -2.0), (3, " b", -1.0))),
        TokenLogprob(4, "bc", -0.2),
    ]
    resp = r.CompletionResponse(
        model="m",
        usage=r.UsageInfo.of(2, 2),
        choices=[
            r.CompletionChoice(
                index=0,
                text=" abc",
                finish_reason="length",
                logprobs=r.completion_logprobs(lp, start_offset=5),
            )
        ],
    )
    data = json.loads(resp.model_dump_json())
    parsed = Completion.model_validate(data)
    assert parsed.id.startswith("cmpl-") and parsed.object == "text_completion"
    logprobs = data["choices"][0]["logprobs"]
    assert logprobs == {
        "tokens": [" a", "bc"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{" a": -0.1, " b": -1.0}, {}],
        "text_offset": [5, 7],
    }
    assert "prompt_tokens_details" not in data["usage"]


def test_stream_chunks_validate_as_openai_types() -> None:
    first = r.ChatCompletionStreamResponse(
        id="chatcmpl-1",
        model="m",
        choices=[r.ChatStreamChoice(index=0, delta=r.DeltaMessage(role="assistant", content=""))],
    )
    data = json.loads(first.model_dump_json())
    assert data["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    assert "usage" not in data
    ChatCompletionChunk.model_validate(data)
    last = r.ChatCompletionStreamResponse(id="chatcmpl-1", model="m", choices=[], usage=r.UsageInfo.of(1, 2))
    assert ChatCompletionChunk.model_validate_json(last.model_dump_json()).usage.completion_tokens == 2  # type: ignore[union-attr]
    # openai's Completion (also its stream chunk type) types finish_reason as non-null; its stream parser
    # does not validate, so mid-stream nulls are fine (tests/api/test_sse.py), and final chunks validate:
    comp = r.CompletionStreamResponse(
        id="cmpl-1", model="m", choices=[r.CompletionChoice(index=1, text="x", finish_reason="stop")]
    )
    Completion.model_validate_json(comp.model_dump_json())


def test_model_list_and_tokenize_shapes() -> None:
    data = json.loads(r.ModelList(data=[r.ModelCard(id="smol", max_model_len=2048)]).model_dump_json())
    assert data["object"] == "list" and data["data"][0]["object"] == "model"
    model = Model.model_validate(data["data"][0])
    assert model.id == "smol" and data["data"][0]["max_model_len"] == 2048
    assert json.loads(r.TokenizeResponse(count=2, max_model_len=8, tokens=[1, 2]).model_dump_json()) == {
        "count": 2,
        "max_model_len": 8,
        "tokens": [1, 2],
    }
    assert r.DetokenizeResponse(prompt="ab").model_dump() == {"prompt": "ab"}


def test_tokenize_requests() -> None:
    assert p.TokenizeRequest.model_validate({"prompt": "x"}).add_special_tokens is None
    assert p.TokenizeRequest.model_validate(MSGS).messages is not None
    assert rejected(p.TokenizeRequest, {}).param is None
    assert rejected(p.TokenizeRequest, {"prompt": "x", **MSGS}).param is None
    assert rejected(p.DetokenizeRequest, {"tokens": [1, -1]}).param == "tokens[1]"
    assert p.DetokenizeRequest.model_validate({"tokens": [1, 2]}).tokens == [1, 2]


# ---- errors: OpenAI error objects, statuses, and the FastAPI handlers -----------------------------


@pytest.mark.parametrize(
    "exc,status,etype,code,headers",
    [
        (errors.InvalidRequest("bad n", param="n"), 400, "invalid_request_error", None, {}),
        (ContextTooLong(8, 6, 4), 400, "invalid_request_error", "context_length_exceeded", {}),
        (
            errors.Unauthorized(),
            401,
            "invalid_request_error",
            "invalid_api_key",
            {"www-authenticate": "Bearer"},
        ),
        (
            errors.NotFound("The model 'x' does not exist.", code="model_not_found"),
            404,
            "invalid_request_error",
            "model_not_found",
            {},
        ),
        (errors.RequestTimeout("slow body"), 408, "timeout_error", "request_timeout", {}),
        (errors.PayloadTooLarge("too big"), 413, "invalid_request_error", "payload_too_large", {}),
        (errors.QueueFull(retry_after=2.2), 429, "rate_limit_error", "queue_full", {"retry-after": "3"}),
        (errors.NotReady(), 503, "server_error", "not_ready", {"retry-after": "5"}),
        (errors.ServiceUnavailable("shutting down"), 503, "server_error", "service_unavailable", {}),
        (errors.EngineFailed(), 503, "server_error", "engine_failed", {}),
        (RuntimeError("secret internals"), 500, "server_error", None, {}),
    ],
)
def test_error_objects(exc: Exception, status: int, etype: str, code: str | None, headers: dict) -> None:
    body = errors.error_body(exc)
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"]
    assert (body["error"]["type"], body["error"]["code"]) == (etype, code)
    response = errors.error_response(exc)
    assert response.status_code == status and json.loads(response.body) == body
    for name, value in headers.items():
        assert response.headers[name] == value
    assert "secret" not in response.body.decode()


def make_app() -> FastAPI:
    """A stand-in for the real routes: validation, conversion and model checks, no engine."""
    app = FastAPI()
    errors.install_handlers(app)

    def checked(req: p.SamplingRequest, prompts: list[str | list[int]], noun: str) -> dict:
        for prompt in prompts:
            ids = prompt if isinstance(prompt, list) else list(range(len(prompt.split())))
            sampling_params(
                req,
                ids,
                max_model_len=128,
                vocab_size=1000,
                generation_defaults={},
                default_max_tokens=64,
                max_logprobs=20,
                noun=noun,
                check_prompt_ids=True,
            )
        return {"ok": True}

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest) -> dict:
        return checked(req, req.prompt_list(), "prompt")

    @app.post("/v1/chat/completions")
    async def chat(req: p.ChatCompletionRequest) -> dict:
        return checked(req, [" ".join(m["content"] for m in req.template_messages())], "messages")

    @app.post("/busy")
    async def busy() -> None:
        raise errors.QueueFull(retry_after=3)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(), raise_server_exceptions=False)


def assert_openai_error(response: object, status: int) -> dict:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("content", [b"{", b'{"prompt": "x",}', b"", b"[]", b'"x"', b"\xff\xfe{", b"null"])
def test_malformed_bodies_are_400(client: TestClient, content: bytes) -> None:
    r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_malformed_json_message(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400)
    assert err["message"].startswith("We could not parse the JSON body") and err["param"] is None


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ],
)
def test_wrong_types_are_400_with_param(client: TestClient, body: dict, param: str) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = assert_openai_error(client.post(path, json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_nan_in_json_is_400(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        content=b'{"prompt": "x", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert assert_openai_error(r, 400)["param"] == "temperature"


def test_context_and_vocab_errors_through_the_app(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": [1] * 100, "max_tokens": 40})
    err = assert_openai_error(r, 400)
    assert err["code"] == "context_length_exceeded" and "140 tokens (100 in the prompt, 40" in err["message"]
    err = assert_openai_error(client.post("/v1/completions", json={"prompt": [1, 1000]}), 400)
    assert err["param"] == "prompt"
    assert client.post("/v1/completions", json={"prompt": [1] * 100}).status_code == 200  # clipped to 28


def test_unknown_route_and_method(client: TestClient) -> None:
    err = assert_openai_error(client.post("/v1/embeddings", json={"input": "x"}), 404)
    assert err["code"] == "unknown_url" and "POST /v1/embeddings" in err["message"]
    r = client.get("/v1/completions")
    assert_openai_error(r, 405)
    assert "POST" in r.headers["allow"]


def test_queue_full_has_retry_after(client: TestClient) -> None:
    r = client.post("/busy")
    assert assert_openai_error(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "3"


def test_unexpected_errors_are_generic_500s_and_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="app.api.errors"):
        r = client.get("/boom")
    err = assert_openai_error(r, 500)
    assert err["message"] == errors.INTERNAL_ERROR_MESSAGE and "secret" not in r.text
    assert any(rec.exc_info and "secret internals" in str(rec.exc_info[1]) for rec in caplog.records)


def test_openai_client_reads_our_errors(client: TestClient) -> None:
    def forward(request: httpx2.Request) -> httpx2.Response:
        r = client.request(
            request.method,
            request.url.path,
            content=request.content,
            headers={"content-type": "application/json"},
        )
        return httpx2.Response(r.status_code, headers=r.headers, content=r.content)

    oai = openai.OpenAI(
        base_url="http://t/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(forward)),
    )
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model="m", prompt="x", temperature=5)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as ctx:
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "a " * 200}])
    assert ctx.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="m", input="x")


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [*p.CompletionRequest.model_fields, *p.ChatCompletionRequest.model_fields]
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "tool", "x"]) | JSON,
        "content": st.text(max_size=8) | JSON,
        "tool_calls": JSON,
        "name": JSON,
    },
)
BODY = (
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8)
    | st.fixed_dictionaries(
        {"messages": st.lists(MESSAGE, max_size=3)},
        optional={k: JSON for k in ("n", "stop", "logit_bias", "max_tokens", "top_logprobs", "logprobs")},
    )
    | st.fixed_dictionaries(
        {"prompt": st.lists(st.integers(-2, 1100), max_size=200) | JSON},
        optional={"max_tokens": st.integers(-1, 200) | JSON, "min_tokens": JSON},
    )
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODY, chat=st.booleans())
def test_client_input_never_reaches_the_500_handler(client: TestClient, body: dict, chat: bool) -> None:
    content = json.dumps(body).encode()  # NaN and Infinity literals included: Python's json reads them
    r = client.post(
        "/v1/chat/completions" if chat else "/v1/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_openai_error(r, 400)
