"""Tool calling on /v1/chat/completions: which tools are offered, how the prompt shows them, and
the grammar that makes `tool_choice: required` or a named function always parse.

Templates that render `tools` themselves get them as they are. Templates that know nothing of
tools (the default model's) get what llama.cpp's server does for generic templates: the tool list
and the answer format in the system message, earlier calls written out in that format, and tool
results as user turns, so every template can render the conversation."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any

from app.api.errors import InvalidRequest
from app.api.messages import ChatTool
from app.api.protocol import ChatCompletionRequest
from app.api.tool_parsers import HermesParser
from app.engine.grammar import JSON_STYLE
from app.engine.types import GrammarSpec

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


def offered_tools(body: ChatCompletionRequest) -> list[ChatTool]:
    """The tools the model may call; checks names and tool_choice first (400 naming the problem)."""
    tools = body.tools or []
    names = [t.function.name for t in tools]
    for name in names:
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"Invalid function name {name!r}: use 1 to 64 letters, digits, underscores or dashes.",
                param="tools",
            )
    if len(set(names)) != len(names):
        raise InvalidRequest("Function names in tools must be unique.", param="tools")
    choice = body.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequest("tool_choice needs tools: the request offers none.", param="tool_choice")
    if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice names the function {choice.function.name!r}, which is not in tools.",
            param="tool_choice",
        )
    return [] if choice == "none" else tools


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_grammar(body: ChatCompletionRequest, tools: Sequence[ChatTool]) -> GrammarSpec | None:
    """With `required` or a named function: exactly one call, its arguments under the function's
    schema. With `auto`: None, the model chooses and the parser reads what it wrote."""
    choice = body.tool_choice
    if not tools or choice in (None, "auto", "none"):
        return None
    if not isinstance(choice, str):
        tools = [t for t in tools if t.function.name == choice.function.name]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": JSON_STYLE}
    open_, close = json.dumps(HermesParser.OPEN + "\n"), json.dumps("\n" + HermesParser.CLOSE)
    return GrammarSpec("lark", f"start: {open_} call {close}\ncall: %json {json.dumps(schema)}")


def tool_prompt(tools: Sequence[ChatTool]) -> str:
    listing = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return (
        "You can call functions to answer. These are the functions, one JSON object per line:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call a function, answer with only this, once per call:\n"
        f'{HermesParser.OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n'
        f"{HermesParser.CLOSE}\n"
        "Otherwise answer normally."
    )


def inject_tools(messages: list[dict[str, Any]], tools: Sequence[ChatTool]) -> list[dict[str, Any]]:
    """The conversation for a template without tool support: tools described in the system
    message, assistant tool calls written in the call format, tool results as user turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [_written_call(c) for c in m["tool_calls"]]
            text = "\n".join(filter(None, [m.get("content") or "", *calls]))
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"}
            )
        else:
            out.append(m)
    if tools:
        prompt = tool_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _written_call(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments", "{}")
    with contextlib.suppress(json.JSONDecodeError):  # not JSON: written as the client sent it
        args = json.loads(args) if isinstance(args, str) else args
    body = json.dumps({"name": fn.get("name", ""), "arguments": args}, ensure_ascii=False)
    return f"{HermesParser.OPEN}\n{body}\n{HermesParser.CLOSE}"
