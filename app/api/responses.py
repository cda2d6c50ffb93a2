"""OpenAI response, stream-chunk and listing schemas, and the engine-logprobs -> OpenAI shapes.

Responses omit None fields as OpenAI does, except the fields OpenAI sends as null."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from app.api.messages import ToolCall
from app.api.protocol import LOGPROB_FLOOR, random_id
from app.engine.types import TokenLogprob

FinishReasonLiteral = Literal["stop", "length", "tool_calls", "timeout", "error"]


class _Response(BaseModel):
    """Omits None fields, as OpenAI does, except the ones OpenAI sends as null (_keep_null)."""

    _keep_null: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        keep = self._keep_null
        return {k: v for k, v in data.items() if v is not None or k in keep}


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> UsageInfo:
        details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=details,
        )


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(_Response):
    """vLLM's Logprob, in prompt_logprobs: one entry of a prompt position's {token id: Logprob}."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt position, None for the first, then {token id: Logprob} with the
# prompt's own token and the top alternatives
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(_Response):
    """A choice of a completion, and of a completion stream chunk (same shape in OpenAI's API)."""

    _keep_null = frozenset({"logprobs", "finish_reason"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonLiteral | None = None
    error: str | None = None  # with finish_reason "error": why this choice could not go on
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, with the request's prompt_logprobs


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # only on the last chunk, with stream_options.include_usage


class ChatLogprobTop(_Response):
    _keep_null = frozenset({"bytes"})
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = Field(default_factory=list)


class ChatChoiceLogprobs(_Response):
    _keep_null = frozenset({"content"})
    content: list[ChatLogprob] | None = None


class ChatMessage(_Response):
    _keep_null = frozenset({"content"})
    role: str = "assistant"  # --response-role, or the last message's (app/api/prepare.py)
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Response):
    _keep_null = frozenset({"logprobs", "finish_reason"})
    index: int
    message: ChatMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReasonLiteral | None = None
    error: str | None = None  # with finish_reason "error": why this choice could not go on


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, with the request's prompt_logprobs


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_Response):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(_Response):
    _keep_null = frozenset({"logprobs", "finish_reason"})
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReasonLiteral | None = None
    error: str | None = None  # with finish_reason "error": why this choice could not go on


class ChatCompletionStreamResponse(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "shardserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str


# ---- engine logprobs -> OpenAI shapes -------------------------------------------------------------


def safe_logprob(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def token_label(token_id: int, text: str, as_ids: bool) -> str:
    """How logprobs name a token: its text, or with --return-tokens-as-token-ids `token_id:ID` (as
    vLLM's), which a client can map back to the token even where its text is not whole UTF-8."""
    return f"token_id:{token_id}" if as_ids else text


def completion_logprobs(
    logprobs: Sequence[TokenLogprob],
    start_offset: int = 0,
    first_prompt_token: tuple[int, str] | None = None,
    as_ids: bool = False,
) -> CompletionLogprobs:
    """The completions API's parallel lists; text_offset counts characters from start_offset.

    first_prompt_token: echo with logprobs (logprobs then starts with the scored prompt): the
    prompt's first token (id, text), which nothing scores, goes first with null logprobs, as in
    OpenAI's API. as_ids: tokens named token_id:ID; text_offset still counts the tokens' text (vLLM
    counts the labels' characters, offsets into no text)."""
    out = CompletionLogprobs()
    offset = start_offset
    if first_prompt_token is not None:
        head_id, head = first_prompt_token
        out.tokens.append(token_label(head_id, head, as_ids))
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(offset)
        offset += len(head)
    for lp in logprobs:
        top: dict[str, float] = {}
        for i, text, value in lp.top:  # distinct ids may share a text: keep the likelier
            label = token_label(i, text, as_ids)
            top[label] = max(top.get(label, LOGPROB_FLOOR), safe_logprob(value))
        out.tokens.append(token_label(lp.token_id, lp.token, as_ids))
        out.token_logprobs.append(safe_logprob(lp.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


def chat_logprobs(logprobs: Sequence[TokenLogprob], as_ids: bool = False) -> ChatChoiceLogprobs:
    """as_ids: tokens named token_id:ID; bytes stay each token's own."""
    return ChatChoiceLogprobs(
        content=[
            ChatLogprob(
                token=token_label(lp.token_id, lp.token, as_ids),
                logprob=safe_logprob(lp.logprob),
                bytes=list(lp.bytes),
                top_logprobs=[
                    ChatLogprobTop(token=token_label(i, t, as_ids), logprob=safe_logprob(v), bytes=list(raw))
                    for (i, t, v), raw in zip(lp.top, lp.top_bytes, strict=True)
                ],
            )
            for lp in logprobs
        ]
    )


def prompt_logprobs(scored: Sequence[TokenLogprob]) -> PromptLogprobs:
    """vLLM's prompt_logprobs from the scored prompt tokens 1.. (token 0 has none: None)."""
    out: PromptLogprobs = [None]
    for lp in scored:
        entry = {
            lp.token_id: PromptLogprob(logprob=safe_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.token)
        }
        for rank, (i, text, value) in enumerate(lp.top, 1):
            entry.setdefault(i, PromptLogprob(logprob=safe_logprob(value), rank=rank, decoded_token=text))
        out.append(entry)
    return out
