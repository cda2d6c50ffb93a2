"""Chat templates rendered by app.tokenizer.chat_template must be byte-identical to transformers'
``apply_chat_template(..., tokenize=False)`` for the same template, messages and special tokens."""

from __future__ import annotations

import copy
import json
from datetime import datetime

import jinja2
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from app.tokenizer.chat_template import ChatTemplateError
from app.tokenizer.tokenizer import Tokenizer

LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if system_message %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools>" }}
    {{- " XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nReturn a json object with function name and arguments within" }}
    {{- " <tool_call></tool_call>" }}
    {{- " XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}" }}
    {{- "\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
          or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# A template that reads OpenAI content parts itself (as multimodal templates do), and knows `developer`.
PARTS_AWARE = """{% for message in messages %}
<|{{ 'dev' if message['role'] == 'developer' else message['role'] }}|>
{% if message['content'] is string %}{{ message['content'] }}{% else %}
{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}
{% endif %}
{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""

# transformers' extras: tojson without HTML escaping and with options, strftime_now, namespace,
# loop controls, dict(), {% generation %} blocks.
FEATURES = """{% set ns = namespace(n=0) %}{% for m in messages %}
{% if m.role == 'system' %}{% continue %}{% endif %}
{% set ns.n = ns.n + 1 %}{% if m.role == 'assistant' %}{% generation %}A: {{ m.content }}{% endgeneration %}
{% else %}{{ m.role }}: {{ m.content | tojson }} {{ dict(k=m.content) | tojson(indent=2, sort_keys=True) }}
{% endif %}{% if ns.n > 2 %}{% break %}{% endif %}{% endfor %}[{{ ns.n }}] {{ strftime_now('%Y') }}
{{ custom_var | default('none') }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief <b>&'\"é 😀"}, {"role": "user", "content": "  What is 2+2?\n"}],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": "second 中文"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "x", "name": None}],
]


def _pair(template: str, bos: str = "<|begin_of_text|>", eos: str = "<|eot_id|>"):
    backend = Backend(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    ref = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, chat_template=template
    )
    ours = Tokenizer(
        backend,
        kind="other",
        bos_token_id=None,
        eos_token_ids=(),
        pad_token_id=None,
        special_tokens={"bos_token": bos, "eos_token": eos},
        chat_templates={"default": template},
    )
    return ours, ref


def _pair_for(template: str, request: pytest.FixtureRequest):
    # the default model's template only when asked, so the others run without the model file
    return _pair(*request.getfixturevalue("default_template")) if template == "default" else _pair(template)


def _as_parts(conversation: list[dict]) -> list[dict]:
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in conversation]


def _check(ours: Tokenizer, ref, mine: list[dict], theirs: list[dict], **kwargs) -> None:
    for gen in (True, False):
        expected = ref.apply_chat_template(
            copy.deepcopy(theirs), tokenize=False, add_generation_prompt=gen, **kwargs
        )
        assert ours.apply_chat_template(mine, add_generation_prompt=gen, **kwargs) == expected


@pytest.fixture(scope="module")
def default_template(default_gguf_reader) -> tuple[str, str, str]:
    fields = default_gguf_reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    bos, eos = (tokens[fields[f"tokenizer.ggml.{k}_token_id"].contents()] for k in ("bos", "eos"))
    return fields["tokenizer.chat_template"].contents(), bos, eos


TEMPLATE_NAMES = ["default model", "llama3-style", "qwen-style", "parts-aware"]


def _named_pair(name: str, request: pytest.FixtureRequest):
    if name == "default model":
        return _pair(*request.getfixturevalue("default_template"))
    return {
        "llama3-style": lambda: _pair(LLAMA3_STYLE),
        "qwen-style": lambda: _pair(QWEN_STYLE, "<|endoftext|>", "<|im_end|>"),
        "parts-aware": lambda: _pair(PARTS_AWARE),
    }[name]()


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_string_content_matches_transformers(name: str, request: pytest.FixtureRequest) -> None:
    ours, ref = _named_pair(name, request)
    for conversation in CONVERSATIONS:
        _check(ours, ref, conversation, conversation)


@pytest.mark.parametrize("template", ["default", LLAMA3_STYLE, QWEN_STYLE])
def test_text_parts_are_joined_for_string_templates(template: str, request: pytest.FixtureRequest) -> None:
    ours, ref = _pair_for(template, request)
    for conversation in CONVERSATIONS:
        _check(ours, ref, _as_parts(conversation), conversation)
    two_parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    _check(ours, ref, two_parts, [{"role": "user", "content": "a\nb"}])


def test_parts_pass_through_to_templates_that_read_them() -> None:
    ours, ref = _pair(PARTS_AWARE)
    for conversation in CONVERSATIONS:
        _check(ours, ref, _as_parts(conversation), _as_parts(conversation))


@pytest.mark.parametrize("template", ["default", LLAMA3_STYLE, QWEN_STYLE])
def test_developer_role_becomes_system(template: str, request: pytest.FixtureRequest) -> None:
    """For templates that never mention `developer`; one that does gets the role unchanged."""
    ours, ref = _pair_for(template, request)
    mine = [{"role": "developer", "content": "rules"}, {"role": "user", "content": "hi"}]
    _check(ours, ref, mine, [{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"}])
    ours, ref = _pair(PARTS_AWARE)  # a template that names the role gets it unchanged
    _check(ours, ref, mine, mine)


def test_tools_and_tool_calls_match_transformers() -> None:
    ours, ref = _pair(QWEN_STYLE, "<|endoftext|>", "<|im_end|>")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather <now> & later, in °C",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    args = {"city": "Zürich", "unit": "<c>"}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
    theirs = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
    ]
    # OpenAI clients send the arguments as a JSON string; templates expect the dict
    mine = copy.deepcopy(theirs)
    mine[2]["tool_calls"][0]["function"]["arguments"] = json.dumps(args)
    _check(ours, ref, mine, theirs, tools=tools)
    _check(ours, ref, mine[1:2], theirs[1:2])  # and without tools


def test_transformers_extras_match() -> None:
    ours, ref = _pair(FEATURES)
    conversation = [
        {"role": "system", "content": "hidden"},
        {"role": "user", "content": "<b>&'é"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
        {"role": "user", "content": "not reached"},
    ]
    _check(ours, ref, conversation, conversation)
    _check(ours, ref, conversation, conversation, custom_var="extra value")
    assert str(datetime.now().year) in ours.apply_chat_template(conversation)


def test_raise_exception_is_a_chat_template_error() -> None:
    ours, ref = _pair(LLAMA3_STYLE)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="alternate"):
        ours.apply_chat_template(bad)


@pytest.mark.parametrize(
    ("template", "messages", "needle"),
    [
        ("{% for m in messages %}{{ m.content }", [], "does not compile: line 1"),
        ("{{ ''.__class__.__mro__ }}", [], "chat template error"),
        ("{% set ns = namespace(_x=1) %}", [], "_x"),
        ("{{ messages[0]['content'] }}", [{"role": "user", "content": [{"type": "image_url"}]}], "image_url"),
        ("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "a"}], "TypeError"),
        ("{{ messages[5]['content'] }}", [{"role": "user", "content": "a"}], "chat template error"),
    ],
)
def test_errors_are_chat_template_errors(template: str, messages: list, needle: str) -> None:
    ours, _ = _pair(template)
    with pytest.raises(ChatTemplateError) as e:
        ours.apply_chat_template(messages)
    assert needle in str(e.value) and isinstance(e.value, ValueError)


def test_no_template_is_a_clear_error() -> None:
    ours, _ = _pair("x")
    ours._templates = {}
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


# a template that reads documents (RAG), in the shape transformers passes them
DOCUMENTS_TEMPLATE = (
    "{% if documents %}{% for doc in documents %}[{{ doc['title'] }}] {{ doc['text'] }}\n{% endfor %}{% endif %}"
    + LLAMA3_STYLE
)
PREFILLED = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}],
    [{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "one, two, "}],  # trailing space
    [{"role": "user", "content": "Hi 中文"}, {"role": "assistant", "content": "Sure 😀"}],
]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_continue_final_message_matches_transformers(name: str, request: pytest.FixtureRequest) -> None:
    """The text ends where the last message's content does, as transformers cuts it (trailing space
    kept where the template keeps it, dropped where it trims)."""
    ours, ref = _named_pair(name, request)
    for conversation in PREFILLED:
        for mine in (conversation, _as_parts(conversation)):
            expected = ref.apply_chat_template(
                copy.deepcopy(mine if name == "parts-aware" else conversation),
                tokenize=False,
                add_generation_prompt=False,
                continue_final_message=True,
            )
            got = ours.apply_chat_template(mine, add_generation_prompt=False, continue_final_message=True)
            assert got == expected and got.rstrip().endswith(conversation[-1]["content"].rstrip())


def test_continue_final_message_without_text_to_continue_is_an_error() -> None:
    ours, _ = _pair(LLAMA3_STYLE)
    with pytest.raises(ChatTemplateError, match="continue_final_message"):
        ours.apply_chat_template([{"role": "assistant", "content": None}], continue_final_message=True)
    drops = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # never writes the content
    ours, _ = _pair(drops)
    with pytest.raises(ChatTemplateError, match="does not write the final message"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], continue_final_message=True)


def test_documents_reach_the_template_as_in_transformers() -> None:
    ours, ref = _pair(DOCUMENTS_TEMPLATE)
    docs = [
        {"title": "Paris", "text": "Capital of France."},
        {"title": "Rome", "text": "Capital of Italy 🇮🇹."},
    ]
    for conversation in CONVERSATIONS[:2]:
        _check(ours, ref, conversation, conversation, documents=docs)
    assert "[Rome] Capital of Italy" in ours.apply_chat_template(CONVERSATIONS[0], documents=docs)
