"""Structured output and tool calling on the default model, through the official openai client.

Outputs are checked with independent tools: the jsonschema library for schemas, Python's re for
regexes, json for tool arguments. Strings and arrays in the schemas are bounded so that a
135M-parameter model finishes them within max_tokens. int8 weights: the constraint does not depend
on the dtype, and a step is 2-3x cheaper than in fp32."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.support.api_server import live_app, started_stack, tiny_settings

pytestmark = pytest.mark.timeout(300)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "person": PERSON,
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["person", "address"],
        "additionalProperties": False,
    },
    "array_enum": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "favourite": {"enum": ["red", "green", "blue"]},
        },
        "required": ["colors", "favourite"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "temperature": {"type": "number", "minimum": -50, "maximum": 60},
            "count": {"type": "integer", "minimum": 1, "maximum": 9},
            "ok": {"type": "boolean"},
        },
        "required": ["temperature", "count", "ok"],
        "additionalProperties": False,  # as OpenAI's strict mode requires: else a model may go on
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 24}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def server(default_model_path):
    settings = tiny_settings(
        default_model_path, dtype="int8", kv_cache_tokens=8192, max_num_seqs=8, served_model_name="smol"
    )
    with started_stack(settings) as stack, live_app(settings, stack) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.openai(timeout=120) as c:
        yield c


def chat(client, content: str, **kw):
    kw.setdefault("max_tokens", 96)
    return client.chat.completions.create(model="smol", messages=[{"role": "user", "content": content}], **kw)


def streamed_text(client, content: str, **kw) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in chat(client, content, stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates_whole_and_streamed_greedy_and_sampled(client, name) -> None:
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    prompt = f"Reply with a JSON object for this: {name.replace('_', ' ')}."
    whole = chat(client, prompt, response_format=fmt, temperature=0).choices[0]
    assert whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), schema)
    text, reason = streamed_text(client, prompt, response_format=fmt, temperature=0)
    assert (text, reason) == (whole.message.content, "stop")  # streaming changes nothing
    for seed in (1, 2):
        sampled = chat(client, prompt, response_format=fmt, temperature=1.0, seed=seed).choices[0]
        assert sampled.finish_reason == "stop", sampled.message.content
        jsonschema.validate(json.loads(sampled.message.content), schema)


def test_json_object_returns_a_json_object(client) -> None:
    prompt = 'What is 2+2? Answer in JSON with the key "answer".'
    r = chat(client, prompt, response_format={"type": "json_object"}, temperature=0)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_guided_choice_and_regex(client) -> None:
    choices = ["positive", "negative", "neutral"]
    for seed in range(3):
        r = chat(
            client,
            "Sentiment of 'I love it'?",
            extra_body={"guided_choice": choices},
            temperature=1.0,
            seed=seed,
        )
        assert r.choices[0].message.content in choices
    pattern = r"\d{3}-\d{3}-\d{4}"
    r = chat(client, "Give me a phone number.", extra_body={"guided_regex": pattern}, temperature=0.7, seed=5)
    assert re.fullmatch(pattern, r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model="smol", prompt="The answer is", max_tokens=8, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert r.choices[0].text in ("yes", "no")


def test_structured_outputs_constrains_both_endpoints_as_the_guided_fields_do(client) -> None:
    """vLLM's current field: each kind gives what its guided_* twin gives, on chat and completions."""
    open_person = {k: v for k, v in PERSON.items() if k != "additionalProperties"}
    kinds = {
        "json": open_person,
        "regex": r"\d{3}-\d{4}",
        "choice": ["yes", "no", "maybe"],
        "grammar": 'root ::= "red" | "green" | "blue"',
    }
    for kind, value in kinds.items():
        new = chat(client, "Answer me.", extra_body={"structured_outputs": {kind: value}}, temperature=0)
        old = chat(client, "Answer me.", extra_body={f"guided_{kind}": value}, temperature=0)
        assert new.choices[0].message.content == old.choices[0].message.content
        text = client.completions.create(
            model="smol", prompt="Answer:", max_tokens=48, temperature=0,
            extra_body={"structured_outputs": {kind: value}},
        ).choices[0].text  # fmt: skip
        if kind == "json":
            jsonschema.validate(json.loads(text), open_person)
        elif kind == "regex":
            assert re.fullmatch(value, text)
        else:
            assert text in (value if kind == "choice" else ["red", "green", "blue"])
    obj = chat(client, "2+2? JSON.", extra_body={"structured_outputs": {"json_object": True}}, temperature=0)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    closed = {"structured_outputs": {"json": open_person, "disable_additional_properties": True}}
    text = chat(client, "A person, with many more fields.", extra_body=closed, temperature=0).choices[0]
    jsonschema.validate(json.loads(text.message.content), PERSON)  # no property beyond name and age


def test_cut_by_max_tokens_is_length_and_no_token_left_is_error(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    r = chat(client, "A person.", response_format=fmt, max_tokens=3, temperature=0).choices[0]
    assert r.finish_reason == "length" and len(r.message.content) > 0
    # the grammar is done after one value, but min_tokens forbids the end of sequence
    r = chat(
        client, "Yes?", extra_body={"guided_choice": ["yes"], "min_tokens": 5}, temperature=0
    ).model_dump()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "error" and "allows no further token" in choice["error"]
    assert choice["message"]["content"] == "yes"


def test_tool_choice_required_and_named_give_calls_that_validate(client) -> None:
    for choice, expected in (
        ("required", None),
        ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
    ):
        r = client.chat.completions.create(
            model="smol",
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            max_tokens=96,
            temperature=0,
        ).choices[0]
        assert r.finish_reason == "tool_calls" and len(r.message.tool_calls) == 1
        call = r.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        assert expected is None or call.function.name == expected
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_streamed_tool_call_deltas_reassemble_to_the_whole_call(client) -> None:
    kw = {
        "model": "smol",
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 96,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    reason = None
    deltas = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            reason = c.finish_reason or reason
            for d in c.delta.tool_calls or ():
                deltas.append(d)
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += d.function.name or "" if d.function else ""
                call["arguments"] += d.function.arguments or "" if d.function else ""
    assert deltas[0].id and deltas[0].function.name == "get_weather"  # id and name come first
    assert reason == "tool_calls" and len(calls) == 1
    assert (calls[0]["name"], json.loads(calls[0]["arguments"])) == (
        whole.message.tool_calls[0].function.name,
        json.loads(whole.message.tool_calls[0].function.arguments),
    )


def test_a_conversation_with_a_tool_result_continues(client, server) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "It is 18 degrees celsius and sunny."},
    ]
    with httpx.Client(base_url=server.url) as h:
        rendered = h.post(
            "/tokenize", json={"model": "smol", "messages": messages, "return_token_strs": True}
        ).json()
    r = client.chat.completions.create(
        model="smol", messages=messages, tools=[WEATHER], max_tokens=48, temperature=0
    )
    reply = r.choices[0].message.content or ""
    assert rendered["count"] > 0 and r.choices[0].finish_reason in ("stop", "length")
    assert "18" in reply or "sunny" in reply.lower()  # the model read the tool's answer


def test_a_constrained_neighbour_does_not_change_a_free_greedy_output(server) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}

    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120
        ) as c:
            free = {
                "model": "smol",
                "messages": [{"role": "user", "content": "Name a colour."}],
                "max_tokens": 24,
                "temperature": 0,
            }
            alone = (await c.chat.completions.create(**free)).choices[0].message.content
            together, _ = await asyncio.gather(
                c.chat.completions.create(**free),
                c.chat.completions.create(
                    model="smol",
                    messages=[{"role": "user", "content": "A person."}],
                    response_format=fmt,
                    max_tokens=40,
                ),
            )
            return alone, together.choices[0].message.content

    alone, together = asyncio.run(run())
    assert alone == together and alone


@pytest.mark.parametrize(
    ("kw", "param", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "bogus"}},
                }
            },
            "response_format",
            "bogus",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
        ({"response_format": {"type": "xml"}}, None, "response_format"),
        ({"extra_body": {"guided_regex": "a(b"}}, "guided_regex", "unclosed group"),
        ({"extra_body": {"guided_json": "[1, 2]"}}, "guided_json", "object"),
        ({"extra_body": {"guided_choice": []}}, None, "guided_choice"),
        ({"extra_body": {"guided_grammar": "root ::= ("}}, "guided_grammar", "GBNF"),
        ({"extra_body": {"guided_choice": ["a"], "guided_regex": "a"}}, "guided_choice", "at most one"),
        (
            {"extra_body": {"structured_outputs": {"choice": ["a"]}, "guided_regex": "a"}},
            "guided_regex",
            "not structured_outputs and guided_regex",
        ),
        ({"extra_body": {"structured_outputs": {"choice": ["a"], "regex": "a"}}}, None, "exactly one"),
        ({"extra_body": {"structured_outputs": {}}}, None, "none given"),
        ({"extra_body": {"structured_outputs": {"regex": "a(b"}}}, "structured_outputs", "unclosed group"),
        ({"extra_body": {"structured_outputs": {"json": "[1]"}}}, "structured_outputs.json", "object"),
        ({"extra_body": {"structured_outputs": {"structural_tag": "{}"}}}, None, "not supported"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "cannot be combined",
        ),
    ],
)
def test_bad_constraints_are_400_naming_the_problem(client, server, kw, param, words) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "x", max_tokens=4, **kw)
    err = e.value.body
    assert words in err["message"] and (param is None or err["param"] == param)
    with httpx.Client(base_url=server.url) as h:  # and the server serves others meanwhile
        assert h.get("/ready").status_code == 200
