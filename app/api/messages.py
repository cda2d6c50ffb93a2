"""The parts every request schema shares (the strict base model) and the parts of a chat
conversation: text messages, tool definitions, tool calls and tool_choice, and the plain dicts a
chat template reads. protocol.py builds the request bodies from them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic_core import PydanticCustomError


def invalid_value(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        # Clients (LangChain, older SDKs) send "stop": null and friends; null means "use the default".
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class FunctionCall(StrictModel):
    name: str
    arguments: str


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessageParam(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise invalid_value("content must not be an empty list")
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise invalid_value(
                        "only text content is supported (every content part must have type 'text')"
                    )
        return v

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessageParam:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise invalid_value(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The content as one string; text parts are joined by newlines, as vLLM does."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text for part in self.content)


def template_messages(messages: Sequence[ChatMessageParam]) -> list[dict[str, Any]]:
    """Plain dicts for a chat template; developer messages become system messages (OpenAI's meaning)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


class FunctionDefinition(StrictModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"] = "function"
    function: NamedFunction
