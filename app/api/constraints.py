"""Which output constraint a generation request asks for: OpenAI's response_format, vLLM's
structured_outputs or one of its older guided_* fields, as the GrammarSpec the engine compiles
(app/engine/grammar.py).

Tool calls with `required` or a named function are the other source of a grammar: app/api/tools.py."""

from __future__ import annotations

import json
from typing import Any

from app.api.errors import InvalidRequest
from app.api.protocol import MAX_GRAMMAR_CHARS, ChatCompletionRequest, CompletionRequest
from app.engine.types import GrammarSpec

FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
# structured_outputs' kinds, as the guided_* field each one is
_STRUCTURED = {
    "json": "guided_json",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}


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
    if name == "structured_outputs":
        return _structured(body), name
    if name == "response_format":
        fmt = body.response_format
        assert fmt is not None
        if fmt.type == "json_object":
            return GrammarSpec("json_schema", '{"type": "object"}'), name
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise InvalidRequest("response_format json_schema needs json_schema.schema.", param=name)
        source = json.dumps(fmt.json_schema.json_schema)
        spec = GrammarSpec("json_schema", source)
    else:
        spec = _guided(name, getattr(body, name))
    return _bounded(spec, name), name


def _guided(name: str, value: Any, param: str | None = None) -> GrammarSpec:
    """The spec of a guided_* field (or the structured_outputs kind `param` that means the same)."""
    param = param or name
    if name == "guided_json":
        source = value if isinstance(value, str) else json.dumps(value)
        try:
            if not isinstance(json.loads(source), dict):
                raise ValueError
        except ValueError:
            raise InvalidRequest(f"{param} must be a JSON schema (an object).", param=param) from None
        return GrammarSpec("json_schema", source)
    if name == "guided_choice":
        return GrammarSpec("choice", json.dumps(value))
    return GrammarSpec("regex" if name == "guided_regex" else "grammar", value)


def _structured(body: ChatCompletionRequest | CompletionRequest) -> GrammarSpec:
    so = body.structured_outputs
    assert so is not None
    if so.json_object:
        return GrammarSpec("json_schema", '{"type": "object"}')
    kind = next(k for k in _STRUCTURED if so.kind_value(k) is not None)
    spec = _guided(_STRUCTURED[kind], so.kind_value(kind), f"structured_outputs.{kind}")
    if kind == "json" and so.disable_additional_properties:
        spec = GrammarSpec("json_schema", json.dumps(_closed(json.loads(spec.source))))
    return _bounded(spec, "structured_outputs")


def _closed(schema: Any) -> Any:
    """vLLM's disable_additional_properties: every object schema that does not say otherwise
    gets "additionalProperties": false."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _bounded(spec: GrammarSpec, name: str) -> GrammarSpec:
    if len(spec.source) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"The {name} is too long (at most {MAX_GRAMMAR_CHARS} characters).", param=name)
    return spec
