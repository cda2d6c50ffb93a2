"""Which output constraint a generation request asks for: OpenAI's response_format or one of vLLM's
guided_* fields, as the GrammarSpec the engine compiles (app/engine/grammar.py).

Tool calls with `required` or a named function are the other source of a grammar: app/api/tools.py."""

from __future__ import annotations

import json

from app.api.errors import InvalidRequest
from app.api.protocol import MAX_GRAMMAR_CHARS, ChatCompletionRequest, CompletionRequest
from app.engine.types import GrammarSpec

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def output_constraint(body: ChatCompletionRequest | CompletionRequest) -> tuple[GrammarSpec, str] | None:
    """The output constraint and the parameter that set it; None for free text."""
    given = [
        name
        for name in FIELDS
        if getattr(body, name) is not None
        and not (name == "response_format" and body.response_format.type == "text")  # type: ignore[union-attr]
    ]
    if len(given) > 1:
        raise InvalidRequest(
            f"Give at most one output constraint, not {' and '.join(given)}.", param=given[1]
        )
    if not given:
        return None
    name = given[0]
    if name == "response_format":
        fmt = body.response_format
        assert fmt is not None
        if fmt.type == "json_object":
            return GrammarSpec("json_schema", '{"type": "object"}'), name
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise InvalidRequest("response_format json_schema needs json_schema.schema.", param=name)
        source = json.dumps(fmt.json_schema.json_schema)
        spec = GrammarSpec("json_schema", source)
    elif name == "guided_json":
        source = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        try:
            if not isinstance(json.loads(source), dict):
                raise ValueError
        except ValueError:
            raise InvalidRequest("guided_json must be a JSON schema (an object).", param=name) from None
        spec = GrammarSpec("json_schema", source)
    elif name == "guided_choice":
        spec = GrammarSpec("choice", json.dumps(body.guided_choice))
    else:
        spec = GrammarSpec("regex" if name == "guided_regex" else "grammar", getattr(body, name))
    if len(spec.source) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"The {name} is too long (at most {MAX_GRAMMAR_CHARS} characters).", param=name)
    return spec, name
