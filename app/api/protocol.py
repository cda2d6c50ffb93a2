"""OpenAI request schemas (pydantic v2) and their limits (responses.py has the response shapes).

Requests are strict (a string is not a number), accept unknown fields (clients send fields we do
not know; app/api/ignored.py names them), treat ``null`` as absent, and reject NaN/inf. Every limit below is a 400 naming the
field. Limits that need the model (vocabulary, context, max_tokens) or the server's settings
(--max-logprobs) are checked by app/api/prepare.py once the prompt is tokenized.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, SkipValidation, ValidationInfo, field_validator, model_validator

from app.api.messages import (
    ChatMessageParam,
    ChatTool,
    NamedToolChoice,
    StrictModel,
    invalid_value,
    template_messages,
)

MAX_N = 16  # choices per request (and best_of, which must equal n)
MAX_STOP = 16  # stop strings per request
MAX_STOP_LEN = 256  # characters per stop string
MAX_LOGIT_BIAS = 1024  # logit_bias entries; each bias in [-100, 100]
MAX_MESSAGES = 1024
MAX_PROMPTS = 64  # prompts in one completions request
MAX_PROMPT_TOKEN_IDS = 131072  # token ids in a pre-tokenized prompt (all prompts together)
MAX_STOP_TOKEN_IDS = 64
MAX_TOOLS = 128
MAX_GRAMMAR_CHARS = 100_000  # a JSON schema, regex or grammar; compiling it is bounded by llguidance
MAX_CHOICES = 256  # guided_choice entries
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1  # ids beyond the vocabulary are caught by app/api/prepare.py
LOGPROB_FLOOR = -9999.0  # what OpenAI sends for -inf, which JSON cannot carry

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
PositiveInt = Annotated[int, Field(ge=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- requests -------------------------------------------------------------------------------------


class StreamOptions(StrictModel):
    include_usage: bool = False


class ResponseFormatJsonSchema(StrictModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: ResponseFormatJsonSchema | None = None


def _check_unicode(value: Any, path: str = "") -> None:
    """JSON's \\ud800-style escapes can spell lone UTF-16 surrogates, which are not Unicode text: no
    tokenizer, regex or log line takes them. Lists of token ids are skipped at their first id."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid_value(
                f"{path or 'the body'} holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode"
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, path)
            _check_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list) and value and type(value[0]) is not int:
        for i, v in enumerate(value):
            _check_unicode(v, f"{path}[{i}]")


_UNSUPPORTED = {
    "use_beam_search": "sampling draws one token at a time (n and best_of give several samples)",
    "allowed_token_ids": "use structured_outputs.choice, or logit_bias",
    "bad_words": "use logit_bias to ban tokens",
    "logits_processors": "no code is run from a request",
    "prompt_embeds": "prompts are text or token ids",
}


class _TopLevel(StrictModel):
    """A whole request body: its text is checked once, here, not by every nested model. Unknown
    top-level fields are kept aside (model_extra) so the route can name them."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


class StructuredOutputs(StrictModel):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES
    )
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # our JSON never has free whitespace anyway (grammar.py)
    disable_additional_properties: bool = False
    disable_fallback: bool = False  # there is one backend, and no fallback
    whitespace_pattern: str | None = None
    structural_tag: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(self, name) is not None:
                raise invalid_value(f"structured_outputs.{name} is not supported")
        kinds = ("json", "regex", "choice", "grammar")
        given = [k for k in kinds if self.kind_value(k) is not None] + (
            ["json_object"] if self.json_object else []
        )
        if len(given) != 1:
            found = " and ".join(given) or "none"
            raise invalid_value(
                f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object ({found} given)"
            )
        return self

    def kind_value(self, kind: str) -> Any:
        return self.json_ if kind == "json" else getattr(self, kind)


class SamplingRequest(_TopLevel):
    """Fields shared by both generation endpoints; order matters to the cross-field validators."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS
    )
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool = False
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)  # lower runs first
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    timeout: float | None = Field(None, gt=0.0)  # seconds; the route turns it into a deadline
    # structured output: OpenAI's response_format, and vLLM's guided_* extras (at most one of them)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES
    )
    guided_grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    structured_outputs: StructuredOutputs | None = None  # vLLM's current name for the guided_* fields
    # vLLM: every prompt token's logprob plus this many alternatives (not streamed)
    prompt_logprobs: int | None = Field(None, ge=0)
    # vLLM's: keep only the prompt's last k tokens (-1: the last that leave room for max_tokens)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    return_tokens_as_token_ids: bool | None = None  # vLLM's; None: --return-tokens-as-token-ids
    # vLLM's fields that would change the output and that we do not implement: refused, not ignored
    use_beam_search: bool = False
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    logits_processors: list[Any] | None = None
    prompt_embeds: Any = None

    @field_validator(
        "use_beam_search", "allowed_token_ids", "bad_words", "logits_processors", "prompt_embeds"
    )
    @classmethod
    def _not_implemented(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in (None, False, []):
            raise invalid_value(f"{info.field_name} is not supported: {_UNSUPPORTED[info.field_name]}")
        return v

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_keeps_something(cls, v: int | None) -> int | None:
        if v == 0:
            raise invalid_value("truncate_prompt_tokens must be -1 or at least 1")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v: StreamOptions | None, info: ValidationInfo) -> Any:
        if v is not None and not info.data.get("stream", False):
            raise invalid_value("stream_options is only allowed when stream is true")
        return v

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_not_streamed(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("stream", False):
            raise invalid_value("prompt_logprobs is not available with stream (as in vLLM)")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise invalid_value("stop must be a string or a list of strings")
        if len(items) > MAX_STOP:
            raise invalid_value(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s or len(s) > MAX_STOP_LEN for s in items):
            raise invalid_value(f"each stop sequence must have 1 to {MAX_STOP_LEN} characters")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or ():
            if not re.fullmatch(r"[0-9]{1,10}", key) or int(key) > MAX_TOKEN_ID:
                raise invalid_value(
                    "logit_bias keys must be token ids (non-negative integers written as strings)"
                )
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        """max_tokens as the client gave it (None: not given); app/api/prepare.py decides the rest."""
        raise NotImplementedError

    @property
    def requested_logprobs(self) -> int | None:
        """None: no logprobs; k >= 0: the sampled token's and k alternatives'."""
        raise NotImplementedError

    @property
    def requested_prompt_logprobs(self) -> int | None:
        """None: the prompt is not scored; k >= 0: each prompt token's logprob and k alternatives'."""
        return self.prompt_logprobs

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def _check_prompt(v: Any) -> Any:
    shape = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(v, str):
        return v
    if not isinstance(v, list) or not v:
        raise invalid_value(shape)
    if all(isinstance(p, str) for p in v):
        if len(v) > MAX_PROMPTS:
            raise invalid_value(f"at most {MAX_PROMPTS} prompts are allowed")
        return v
    lists = v if all(isinstance(p, list) for p in v) else [v]
    if len(lists) > MAX_PROMPTS:
        raise invalid_value(f"at most {MAX_PROMPTS} prompts are allowed")
    if sum(len(ids) for ids in lists) > MAX_PROMPT_TOKEN_IDS:
        raise invalid_value(f"at most {MAX_PROMPT_TOKEN_IDS} prompt token ids are allowed")
    # type() rather than isinstance() so that true/false are not token ids; a set keeps 128k ids cheap
    if any(
        not ids or set(map(type, ids)) != {int} or min(ids) < 0 or max(ids) > MAX_TOKEN_ID for ids in lists
    ):
        raise invalid_value(
            shape + f" (token ids are integers in [0, {MAX_TOKEN_ID}], prompts are non-empty)"
        )
    return v


class CompletionRequest(SamplingRequest):
    # _check_prompt validates the whole shape; pydantic's union would cost ~60 ms on 128k ids
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], SkipValidation]
    echo: bool = False  # before max_tokens and logprobs: their validators read it
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (echo or prompt_logprobs)
    logprobs: int | None = Field(None, ge=0)
    suffix: str | None = None
    best_of: PositiveInt | None = None
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS before a text prompt

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        return _check_prompt(v)

    @field_validator("max_tokens")
    @classmethod
    def _something_to_return(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v == 0 and not info.data.get("echo") and info.data.get("prompt_logprobs") is None:
            raise invalid_value(
                "max_tokens 0 needs echo or prompt_logprobs: there would be nothing to return"
            )
        return v

    @field_validator("logprobs")
    @classmethod
    def _echo_not_streamed(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("echo") and info.data.get("stream"):
            raise invalid_value(
                "echo with logprobs is not available with stream (prompt logprobs are not streamed)"
            )
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise invalid_value("suffix is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v < n:
            raise invalid_value("best_of must be greater than or equal to n")
        if v is not None and v > n:
            raise invalid_value("best_of greater than n is not supported")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs  # OpenAI completions: k = how many alternatives besides the sampled token

    @property
    def requested_prompt_logprobs(self) -> int | None:
        # echo with logprobs: the prompt's tokens come back with their logprobs, as OpenAI's legacy API
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs

    def prompt_list(self) -> list[str | list[int]]:
        """Each prompt of the request: a string or token ids; choice index = prompt index * n + i."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatTemplateFields(_TopLevel):
    """How messages become the prompt text, as vLLM takes it on /v1/chat/completions and /tokenize."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the reply continues the last message (no end-of-turn)
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = Field(None, max_length=MAX_MESSAGES)
    chat_template: str | None = None  # vLLM runs it only with --trust-request-chat-template

    @field_validator("continue_final_message")
    @classmethod
    def _continue_or_new_turn(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("add_generation_prompt", True):
            raise invalid_value("continue_final_message needs add_generation_prompt to be false")
        return v

    @field_validator("chat_template")
    @classmethod
    def _no_request_template(cls, v: str | None) -> str | None:
        if v is not None:
            raise invalid_value(
                "chat_template in a request is never run (a template is code); the server's is "
                "the model's own or --chat-template"
            )
        return v


class ChatCompletionRequest(SamplingRequest, ChatTemplateFields):
    messages: list[ChatMessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: PositiveInt | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    echo: bool = False  # vLLM: prepend the last message's content when it has the reply's role
    add_special_tokens: bool = False  # vLLM's: the template writes any BOS itself

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs", False):
            raise invalid_value("top_logprobs requires logprobs to be true")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.messages)


class TokenizeRequest(ChatTemplateFields):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageParam] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (as vLLM)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise invalid_value("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_TopLevel):
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=MAX_PROMPT_TOKEN_IDS)
