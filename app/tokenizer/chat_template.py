"""Render Hugging Face chat templates exactly as transformers' ``apply_chat_template(tokenize=False)``.

Templates come from model files, so they are untrusted code: they run in jinja2's immutable sandbox
with the same globals and filters transformers gives them (``raise_exception``, ``strftime_now``, a
``tojson`` that does not HTML-escape, ``{% generation %}`` blocks, loop controls). Before rendering,
OpenAI-shaped messages are adapted to what the template can read: lists of text parts are joined
for templates that only handle strings, ``developer`` becomes ``system`` for templates that never
mention it, and tool-call arguments sent as JSON strings become the dicts templates expect.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template does not compile, raised an error, or cannot render these messages."""


class _GenerationBlock(jinja2.ext.Extension):
    # transformers' templates may wrap assistant turns in {% generation %} to mark trainable spans;
    # for rendering the block is transparent, but without this tag such templates fail to parse.
    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _Namespace(jinja2.utils.Namespace):
    # Like transformers: a namespace may not hold underscore names, which would reach CPython internals.
    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick: `self` may be a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes '<', '>', '&' and "'", which would change the prompt bytes.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictBuilder:
    # dict() without exposing the dict type object itself to the sandbox
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Compiled:
    template: jinja2.Template
    knows_developer: bool  # the source mentions the role, so it gets it unchanged
    iterates_content: bool  # the template loops over message content, i.e. takes a list of parts
    knows_tools: bool  # the template reads `tools`: it renders the tool list itself


@lru_cache(maxsize=16)
def compile_template(source: str) -> _Compiled:
    """Compile (and cache) a template; a syntax error is a ChatTemplateError with its line."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictBuilder()
    env.globals["namespace"] = _Namespace
    try:
        ast = env.parse(source)
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: line {e.lineno}: {e.message}") from e
    knows_tools = "tools" in jinja2.meta.find_undeclared_variables(ast)
    return _Compiled(template, "developer" in source, _iterates_content(ast), knows_tools)


def _iterates_content(ast: jinja2.nodes.Template) -> bool:
    # A template that loops over `message['content']` / `message.content` (directly or through a
    # variable set from it) expects OpenAI content parts; any other template expects a string.
    content_vars = {"content"}
    for node in ast.find_all(jinja2.nodes.Assign):
        if isinstance(node.target, jinja2.nodes.Name) and _reads_content(node.node, content_vars):
            content_vars.add(node.target.name)
    return any(_reads_content(loop.iter, content_vars) for loop in ast.find_all(jinja2.nodes.For))


def _reads_content(expr: jinja2.nodes.Node, names: set[str]) -> bool:
    while isinstance(expr, jinja2.nodes.Filter) and expr.node is not None:
        expr = expr.node  # e.g. `message['content'] | selectattr(...)`
    if isinstance(expr, jinja2.nodes.Getitem):
        return isinstance(expr.arg, jinja2.nodes.Const) and expr.arg.value == "content"
    if isinstance(expr, jinja2.nodes.Getattr):
        return expr.attr == "content"
    return isinstance(expr, jinja2.nodes.Name) and expr.name in names and expr.name != "content"


def _plain(value: Any) -> Any:
    # Only JSON-like values reach the sandbox: rich objects can carry methods it does not know are
    # unsafe. Pydantic models (the openai SDK's messages) and dataclasses are dumped first.
    if value is None or type(value) in (str, int, float, bool):
        return value
    # subclasses (str enums, numpy-like scalars) carry extra methods: back to the base type
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _adapt_message(message: dict, compiled: _Compiled) -> dict:
    msg = {k: v for k, v in message.items() if v is not None}  # as transformers: None means absent
    if msg.get("role") == "developer" and not compiled.knows_developer:
        msg["role"] = "system"  # OpenAI's developer role is the system prompt under a new name
    content = msg.get("content")
    if isinstance(content, list) and not compiled.iterates_content:
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"message content part of type {kind!r} is not supported (text only)")
            texts.append(part["text"])
        msg["content"] = "\n".join(texts)  # vLLM joins text parts the same way
    for call in msg.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                parsed = json.loads(function["arguments"])
            except json.JSONDecodeError:
                continue  # not JSON: leave it as the client sent it
            if isinstance(parsed, dict):
                function["arguments"] = parsed  # templates render arguments with tojson, expecting a dict
    reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
    if reasoning is not None:  # transformers aliases these so any template finds the reasoning
        msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
    return msg


def render_chat(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    continue_final_message: bool = False,
    special_tokens: Mapping[str, str | None] | None = None,
    **extra: Any,
) -> str:
    """Render one conversation. ``special_tokens`` (bos_token, eos_token, ...) are overridden by ``extra``.

    continue_final_message: the text ends right after the last message's content, without the
    template's end of turn, so the model carries that message on (transformers' rule: the last
    occurrence of the content in the rendered text)."""
    compiled = compile_template(source)
    plain_messages = _plain(list(messages))
    for i, message in enumerate(plain_messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"message {i} is not an object: {message!r}"[:200])
    chat = [_adapt_message(m, compiled) for m in plain_messages]
    if continue_final_message:
        _mark_final_message(chat)
    variables = {**(special_tokens or {}), **_plain(extra)}
    try:
        text = compiled.template.render(
            messages=chat,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e.message or type(e).__name__}") from e
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e
    return _cut_at_mark(text) if continue_final_message else text


_CONTINUE_MARK = "<|shardserve-continue|> "


def _mark_final_message(chat: list[dict]) -> None:
    """The final message's (last) text gets a mark, to cut the rendered text at: whatever the
    template writes after that message (its end of turn) goes."""
    content = chat[-1].get("content") if chat else None
    if isinstance(content, str):
        chat[-1]["content"] = content + _CONTINUE_MARK
        return
    for part in reversed(content if isinstance(content, list) else []):
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            part["text"] += _CONTINUE_MARK
            return
    raise ChatTemplateError("continue_final_message needs a final message with text content")


def _cut_at_mark(text: str) -> str:
    at = text.rfind(_CONTINUE_MARK.strip())
    if at < 0:
        raise ChatTemplateError(
            "continue_final_message: the chat template does not write the final message's content"
        )
    # a template that trims the content trims its trailing space too: so does the cut
    return text[:at] if text.startswith(_CONTINUE_MARK, at) else text[:at].rstrip()
