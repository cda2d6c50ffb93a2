"""Preparing a request: an OpenAI body, checked against the served model, becomes GenerateRequests.

Every check the API makes happens here, before anything reaches the engine, so the engine never
sees a request the API would reject; each check is written once: the chat template's render (also
/tokenize's), the vocabulary bound (also /detokenize's), the context, and `max_tokens`, decided in
`sampling_params` alone. Choice index = prompt index * n + choice (OpenAI's rule for several
prompts); usage counts each prompt once however many choices share it."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.api import protocol as p
from app.api.card import ServedModel, ServedTokenizer
from app.api.constraints import output_constraint
from app.api.errors import ContextTooLong, InvalidRequest
from app.api.tools import inject_tools, offered_tools, tool_grammar
from app.engine.grammar import GrammarError
from app.engine.types import GenerateRequest, GrammarSpec, SamplingParams
from app.settings import Settings
from app.tokenizer.chat_template import ChatTemplateError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
# names the renderer sets itself: a client's chat_template_kwargs may not override them
_RESERVED_TEMPLATE_ARGS = frozenset(
    {"messages", "add_generation_prompt", "tools", "documents", "source", "special_tokens"}
)


@dataclass(frozen=True)
class Prepared:
    """One HTTP generation request, checked and tokenized: what the engine will run."""

    kind: Literal["chat", "completion"]
    response_id: str
    model: str
    created: int
    requests: tuple[GenerateRequest, ...]  # one per prompt
    echo: tuple[str, ...]  # text each prompt's choices start with ("" without echo)
    n: int
    logprobs: bool
    stream: bool
    include_usage: bool
    tool_parser: str | None = None  # chat with tools offered: the format tool calls are read back from
    show_prompt_logprobs: bool = False  # the request asked for vLLM's prompt_logprobs field
    # completions' echo with logprobs: each prompt's first token (its logprobs are null); else empty
    prompt_heads: tuple[tuple[int, str], ...] = ()  # (id, text)
    role: str = "assistant"  # chat: the reply's role (--response-role, or the last message's)
    tokens_as_ids: bool = False  # --return-tokens-as-token-ids: logprobs name tokens token_id:ID
    prompt_tokens_details: bool = False  # --enable-prompt-tokens-details: usage has cached_tokens

    @property
    def num_choices(self) -> int:
        return len(self.requests) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)


# ---- the checks, each in one place ----------------------------------------------------------------


def check_vocab(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Token ids a client gave must embed and decode: below the served vocabulary."""
    if ids and max(ids) >= vocab_size:
        raise InvalidRequest(
            f"Token id {max(ids)} in {param} is outside the vocabulary (ids must be below {vocab_size}).",
            param=param,
        )


def check_logprobs(body: p.SamplingRequest, limit: int) -> None:
    """Every count of alternatives a request asks is at most --max-logprobs (vLLM's check, whose
    message this keeps); completions' echo scores the prompt with `logprobs`, checked here too."""
    sampled = "top_logprobs" if isinstance(body, p.ChatCompletionRequest) else "logprobs"
    for param, k in ((sampled, body.requested_logprobs), ("prompt_logprobs", body.prompt_logprobs)):
        if k is not None and k > limit:
            raise InvalidRequest(
                f"Requested {param} of {k}, which is greater than max allowed: {limit} (--max-logprobs).",
                param=param,
            )


def render_chat(
    tok: ServedTokenizer,
    messages: list[dict[str, Any]],
    how: p.ChatTemplateFields,
    defaults: Mapping[str, Any],
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text of a conversation; a template that fails is the client's 400 (messages).

    defaults: --default-chat-template-kwargs, under the request's own kwargs (its keys win, as in
    vLLM); /tokenize takes them too, so that it counts the tokens a chat request would run."""
    merged = {**defaults, **(how.chat_template_kwargs or {})}
    extra = {k: v for k, v in merged.items() if k not in _RESERVED_TEMPLATE_ARGS}
    try:
        return tok.apply_chat_template(
            messages,
            add_generation_prompt=how.add_generation_prompt,
            tools=tools,
            documents=how.documents,
            continue_final_message=how.continue_final_message,
            **extra,
        )
    except ChatTemplateError as e:
        raise InvalidRequest(f"{str(e)[:300]}.", param="messages") from None


def sampling_params(
    body: p.SamplingRequest,
    prompt_ids: Sequence[int],
    *,
    max_model_len: int,
    vocab_size: int,
    generation_defaults: Mapping[str, Any],
    default_max_tokens: int,
    max_logprobs: int,
    noun: str = "prompt",
    check_prompt_ids: bool = False,
) -> SamplingParams:
    """The request's sampling for one prompt, built once: client values, else the model's
    generation defaults, else OpenAI's; ids inside the vocabulary, prompt and output inside the
    context. `max_tokens` is decided here and nowhere else: the client's, which must fit (an error
    otherwise, as OpenAI), else the default clipped to the room the prompt leaves.

    noun is the parameter that holds the prompt ("prompt" or "messages"); check_prompt_ids: the
    client gave the prompt as token ids; max_logprobs: --max-logprobs (-1: the vocabulary size)."""
    prompt_len = len(prompt_ids)
    if prompt_len <= 0:
        raise InvalidRequest(f"The {noun} is empty: there is nothing to complete.", param=noun)
    logit_bias = tuple(sorted((int(k), float(b)) for k, b in (body.logit_bias or {}).items()))
    stop_token_ids = tuple(body.stop_token_ids or ())
    if check_prompt_ids:
        check_vocab(prompt_ids, vocab_size, "prompt")
    check_vocab(stop_token_ids, vocab_size, "stop_token_ids")
    check_vocab([t for t, _ in logit_bias], vocab_size, "logit_bias")
    check_logprobs(body, vocab_size if max_logprobs == -1 else max_logprobs)
    if prompt_len >= max_model_len:
        raise ContextTooLong(max_model_len, prompt_len, noun=noun)
    room = max_model_len - prompt_len
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        default = int(generation_defaults.get("max_tokens", default_max_tokens))
        max_tokens = min(default_max_tokens, default, room)
    elif max_tokens > room:
        raise ContextTooLong(max_model_len, prompt_len, max_tokens, noun=noun)
    if body.min_tokens > max_tokens:
        raise InvalidRequest(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens}).", param="min_tokens"
        )

    def pick(name: str, fallback: float) -> Any:
        value = getattr(body, name)
        return value if value is not None else generation_defaults.get(name, fallback)

    return SamplingParams(
        temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=max(0, int(pick("top_k", 0))),
        min_p=float(pick("min_p", 0.0)),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        presence_penalty=float(pick("presence_penalty", 0.0)),
        frequency_penalty=float(pick("frequency_penalty", 0.0)),
        logit_bias=logit_bias,
        seed=body.seed,
        n=body.n,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        stop=body.stop_list(),
        stop_token_ids=stop_token_ids,
        ignore_eos=body.ignore_eos,
        logprobs=body.requested_logprobs,
        prompt_logprobs=body.requested_prompt_logprobs,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
    )


# ---- the two endpoints ----------------------------------------------------------------------------


def prepare_chat(
    body: p.ChatCompletionRequest, card: ServedModel, settings: Settings, now: float
) -> Prepared:
    tok = card.tokenizer
    tools = offered_tools(body)
    grammar = output_constraint(body)
    call_grammar = tool_grammar(body, tools)
    if call_grammar is not None:
        if grammar is not None:
            raise InvalidRequest(
                f"tool_choice {body.tool_choice!r} cannot be combined with {grammar[1]}.", param=grammar[1]
            )
        grammar = (call_grammar, "tools")
    messages = body.template_messages()
    template_tools = None
    if tok.template_knows_tools():
        template_tools = [t.model_dump(exclude_none=True) for t in tools] or None
    else:
        messages = inject_tools(messages, tools)
    text = render_chat(tok, messages, body, settings.default_chat_template_kwargs, template_tools)
    ids = truncated(tok.encode(text, add_special_tokens=body.add_special_tokens), body, card.max_model_len)
    last = body.messages[-1]
    # vLLM's: the reply is a new message of --response-role, or continues the last message
    role = settings.response_role if body.add_generation_prompt else last.role
    echo = last.text() if body.echo and last.role == role else ""
    parser = settings.tool_call_parser if tools else None
    return _prepare("chat", body, card, settings, [(ids, echo)], now, grammar, parser, role=role)


def prepare_completion(
    body: p.CompletionRequest, card: ServedModel, settings: Settings, now: float
) -> Prepared:
    tok = card.tokenizer
    prompts = []
    pretokenized = False
    for prompt in body.prompt_list():
        pretokenized = isinstance(prompt, list)
        whole = (
            list(prompt) if pretokenized else tok.encode(prompt, add_special_tokens=body.add_special_tokens)
        )
        ids = truncated(whole, body, card.max_model_len)
        echo = ""
        if body.echo:  # the prompt the model saw: after any truncation
            echo = (
                prompt
                if isinstance(prompt, str) and ids == whole
                else _decode_prompt(tok, ids, card.vocab_size)
            )
        prompts.append((ids, echo))
    grammar = output_constraint(body)
    return _prepare("completion", body, card, settings, prompts, now, grammar, pretokenized=pretokenized)


def truncated(ids: list[int], body: p.SamplingRequest, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens; -1: the last that leave room for
    the requested max_tokens (one token when none is given) in the context."""
    k = body.truncate_prompt_tokens
    if k == -1:
        k = max_model_len - max(body.requested_max_tokens or 1, 1)
    return ids[-k:] if k is not None and 0 < k < len(ids) else ids


def _decode_prompt(tok: ServedTokenizer, ids: Sequence[int], vocab_size: int) -> str:
    if max(ids) >= vocab_size:
        return ""  # sampling_params rejects it right after with the real reason
    return tok.decode(ids, skip_special_tokens=False)


def _prepare(
    kind: Literal["chat", "completion"],
    body: p.ChatCompletionRequest | p.CompletionRequest,
    card: ServedModel,
    settings: Settings,
    prompts: Sequence[tuple[Sequence[int], str]],
    now: float,
    grammar: tuple[GrammarSpec, str] | None,
    tool_parser: str | None = None,
    *,
    pretokenized: bool = False,
    role: str = "assistant",
) -> Prepared:
    params = [
        sampling_params(
            body,
            ids,
            max_model_len=card.max_model_len,
            vocab_size=card.vocab_size,
            generation_defaults=card.tokenizer.generation_defaults,
            default_max_tokens=card.max_model_len if kind == "chat" else COMPLETIONS_DEFAULT_MAX_TOKENS,
            max_logprobs=settings.max_logprobs,
            noun="messages" if kind == "chat" else "prompt",
            check_prompt_ids=pretokenized,
        )
        for ids, _ in prompts
    ]
    spec = None
    if grammar is not None:
        spec, param = grammar
        try:
            card.grammars.check(spec)  # compiled once here; the engine takes it from the cache
        except GrammarError as e:
            raise InvalidRequest(f"Invalid {param}: {e}", param=param) from None
    limits = [t for t in (body.timeout, settings.request_timeout) if t is not None]
    deadline = now + min(limits) if limits else None
    response_id = p.random_id("chatcmpl" if kind == "chat" else "cmpl")
    rids = [response_id] if len(prompts) == 1 else [f"{response_id}-{i}" for i in range(len(prompts))]
    requests = tuple(
        GenerateRequest(rid, tuple(ids), sp, now, body.priority, deadline, spec)
        for rid, (ids, _), sp in zip(rids, prompts, params, strict=True)
    )
    asked_usage = body.stream_options is not None and body.stream_options.include_usage
    include_usage = asked_usage or settings.enable_force_include_usage
    echo_logprobs = isinstance(body, p.CompletionRequest) and body.echo and body.logprobs is not None
    heads = tuple((ids[0], card.tokenizer.token_text(ids[0])) for ids, _ in prompts) if echo_logprobs else ()
    return Prepared(
        kind, response_id, card.name, int(time.time()), requests, tuple(echo for _, echo in prompts),
        body.n, body.requested_logprobs is not None, body.stream, include_usage, tool_parser,
        body.prompt_logprobs is not None, heads, role,
        settings.return_tokens_as_token_ids if body.return_tokens_as_token_ids is None else body.return_tokens_as_token_ids,
        settings.enable_prompt_tokens_details,
    )  # fmt: skip
