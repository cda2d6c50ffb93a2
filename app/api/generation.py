"""OpenAI request -> GenerateRequests, and RequestOutputs -> OpenAI chunks or one whole response.

Every check the API makes happens in prepare_*, before anything reaches the engine, so the engine
never sees a request the API would reject. Choice index = prompt index * n + choice (OpenAI's rule
for several prompts); usage counts each prompt once however many choices share it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.api import protocol as p
from app.api import responses as r
from app.api.backpressure import Ticket
from app.api.constraints import output_constraint
from app.api.deps import AccessRecord
from app.api.errors import EngineFailed, InvalidRequest, ServiceUnavailable
from app.api.model_check import check_against_model
from app.api.sse import encode_event
from app.api.tool_parsers import PARSERS, CallEvent, ContentEvent, Event, ToolCallParser
from app.api.tools import inject_tools, offered_tools, tool_grammar
from app.chat_template import ChatTemplateError
from app.engine.client import EngineClient
from app.engine.grammar import GrammarError
from app.engine.types import FinishReason, GenerateRequest, GrammarSpec, RequestOutput, TokenLogprob
from app.runtime import Runtime

CUT_SHORT = "The server is shutting down; the request was cut short."
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
    prompt_heads: tuple[str, ...] = ()

    @property
    def num_choices(self) -> int:
        return len(self.requests) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)


def _deadline(body: p._SamplingRequest, server_limit: float | None, now: float) -> float | None:
    limits = [t for t in (body.timeout, server_limit) if t is not None]
    return now + min(limits) if limits else None


def _prepare(
    kind: Literal["chat", "completion"],
    body: p.ChatCompletionRequest | p.CompletionRequest,
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    echo: Sequence[str],
    *,
    pretokenized: bool,
    now: float,
    grammar: tuple[GrammarSpec, str] | None = None,
    tool_parser: str | None = None,
) -> Prepared:
    tok = runtime.tokenizer
    default_max = runtime.max_model_len if kind == "chat" else COMPLETIONS_DEFAULT_MAX_TOKENS
    base = body.to_sampling_params(
        default_max_tokens=default_max, generation_defaults=tok.generation_defaults
    )
    vocab = min(tok.vocab_size, runtime.config.vocab_size)  # ids must embed and decode
    deadline = _deadline(body, runtime.settings.request_timeout, now)
    spec = None
    if grammar is not None:
        spec, param = grammar
        try:
            runtime.grammars.check(spec)  # compiled once here; the engine takes it from the cache
        except GrammarError as e:
            raise InvalidRequest(f"Invalid {param}: {e}", param=param) from None
    response_id = p.random_id("chatcmpl" if kind == "chat" else "cmpl")
    requests = []
    for i, ids in enumerate(prompts):
        params = check_against_model(
            base,
            len(ids),
            vocab_size=vocab,
            max_model_len=runtime.max_model_len,
            max_tokens_given=body.requested_max_tokens is not None,
            prompt_token_ids=ids if pretokenized else (),
            noun="messages" if kind == "chat" else "prompt",
        )
        rid = response_id if len(prompts) == 1 else f"{response_id}-{i}"
        requests.append(GenerateRequest(rid, tuple(ids), params, now, body.priority, deadline, spec))
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    echo_logprobs = isinstance(body, p.CompletionRequest) and body.echo and body.logprobs is not None
    heads = tuple(tok.token_text(ids[0]) for ids in prompts) if echo_logprobs else ()  # ids checked above
    return Prepared(
        kind, response_id, runtime.model_name, int(time.time()), tuple(requests), tuple(echo),
        body.n, base.logprobs is not None, body.stream, include_usage, tool_parser,
        body.prompt_logprobs is not None, heads,
    )  # fmt: skip


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (kwargs or {}).items() if k not in _RESERVED_TEMPLATE_ARGS}


def prepare_chat(body: p.ChatCompletionRequest, runtime: Runtime, now: float) -> Prepared:
    tok = runtime.tokenizer
    extra = template_kwargs(body.chat_template_kwargs)
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
    try:
        text = tok.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt, tools=template_tools, **extra
        )
    except ChatTemplateError as e:
        raise InvalidRequest(f"{str(e)[:300]}.", param="messages") from None
    ids = tok.encode(text, add_special_tokens=False)  # the template writes any BOS itself
    last = body.messages[-1]
    echo = last.text() if body.echo and last.role == "assistant" else ""
    parser = runtime.settings.tool_call_parser if tools else None
    return _prepare(
        "chat", body, runtime, [ids], [echo], pretokenized=False, now=now, grammar=grammar, tool_parser=parser
    )


def prepare_completion(body: p.CompletionRequest, runtime: Runtime, now: float) -> Prepared:
    tok = runtime.tokenizer
    prompts, echo = [], []
    pretokenized = not isinstance(body.prompt, str) and not all(isinstance(x, str) for x in body.prompt)
    for prompt in body.prompt_list():
        ids = list(prompt) if isinstance(prompt, list) else tok.encode(prompt)
        prompts.append(ids)
        if body.echo:
            echo.append(prompt if isinstance(prompt, str) else _decode_prompt(tok, ids))
        else:
            echo.append("")
    return _prepare(
        "completion",
        body,
        runtime,
        prompts,
        echo,
        pretokenized=pretokenized,
        now=now,
        grammar=output_constraint(body),
    )


def _decode_prompt(tok: Any, ids: Sequence[int]) -> str:
    if max(ids) >= tok.vocab_size:
        return ""  # check_against_model rejects it right after with the real reason
    return tok.decode(ids, skip_special_tokens=False)


# ---- engine outputs ----------------------------------------------------------------------------


async def outputs_of(client: EngineClient, requests: Sequence[GenerateRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
    """(prompt index, output) for every request, interleaved as they come; closing it aborts the rest."""
    if len(requests) == 1:
        async with contextlib.aclosing(client.generate(requests[0])) as gen:
            async for out in gen:
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, req: GenerateRequest) -> None:
        try:
            async with contextlib.aclosing(client.generate(req)) as gen:
                async for out in gen:
                    queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        open_requests = len(tasks)
        while open_requests:
            i, item = await queue.get()
            if item is None:
                open_requests -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Tally:
    """Usage, the access record and the admission ticket, updated from each output."""

    def __init__(self, prep: Prepared, ticket: Ticket, record: AccessRecord) -> None:
        self.prep, self.ticket, self.record = prep, ticket, record
        self.completion = [0] * prep.num_choices
        self.cached = [0] * len(prep.requests)
        record.prompt_tokens = prep.prompt_tokens

    def add(self, prompt: int, out: RequestOutput) -> int:
        """The choice index of out; raises for outputs that end the whole request."""
        if out.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
            self.record.finish_reason = out.finish_reason.value
        if out.finish_reason is FinishReason.ERROR and not out.choice_error:
            raise EngineFailed(f"The request failed: {out.error or 'the worker ranks failed'}.")
        if out.finish_reason is FinishReason.ABORT:  # only the drain aborts a request someone listens to
            raise ServiceUnavailable(CUT_SHORT)
        if self.record.first_output is None:
            self.record.first_output = time.monotonic()
            self.ticket.start()
        if self.record.queue_time is None and out.queue_time is not None:
            self.record.queue_time = out.queue_time
        index = prompt * self.prep.n + out.index
        self.completion[index] = out.completion_tokens
        if self.record.texts is not None:
            self.record.texts["outputs"][index] += out.text
        self.cached[prompt] = max(self.cached[prompt], out.cached_tokens)
        self.record.completion_tokens = sum(self.completion)
        self.record.cached_tokens = sum(self.cached)
        if out.finish_reason is not None:
            self.record.finish_reason = out.finish_reason.value
        return index

    def usage(self) -> r.UsageInfo:
        return r.UsageInfo.of(self.prep.prompt_tokens, sum(self.completion), sum(self.cached))


async def chat_stream(
    prep: Prepared, outputs: AsyncIterator[tuple[int, RequestOutput]], tally: Tally
) -> AsyncIterator[bytes]:
    def chunk(choices: list[r.ChatStreamChoice], usage: r.UsageInfo | None = None) -> bytes:
        return encode_event(
            r.ChatCompletionStreamResponse(
                id=prep.response_id, created=prep.created, model=prep.model, choices=choices, usage=usage
            )
        )

    for i in range(prep.num_choices):  # the role first, as OpenAI does, before any token exists
        delta = r.DeltaMessage(role="assistant", content=prep.echo[i // prep.n])
        yield chunk([r.ChatStreamChoice(index=i, delta=delta)])
    parsers = [_tool_parser(prep) for _ in range(prep.num_choices)]
    called = [False] * prep.num_choices
    async with contextlib.aclosing(outputs):
        async for prompt, out in outputs:
            i = tally.add(prompt, out)
            lp = r.chat_logprobs(out.logprobs) if prep.logprobs and out.logprobs else None
            parser = parsers[i]
            if parser is None:
                if out.text or lp is not None:
                    yield chunk(
                        [r.ChatStreamChoice(index=i, delta=r.DeltaMessage(content=out.text), logprobs=lp)]
                    )
            else:  # text inside a tool call is held until the call is whole, logprobs are not
                events = parser.feed(out.text) + (parser.finish() if out.finish_reason is not None else [])
                called[i] = called[i] or any(isinstance(e, CallEvent) for e in events)
                deltas = [d for e in events for d in _deltas(e)] or (
                    [r.DeltaMessage()] if lp is not None else []
                )
                for j, delta in enumerate(deltas):
                    yield chunk([r.ChatStreamChoice(index=i, delta=delta, logprobs=lp if j == 0 else None)])
            if out.finish_reason is not None:
                reason = _finish_reason(out, called[i])
                end = r.ChatStreamChoice(
                    index=i, delta=r.DeltaMessage(), finish_reason=reason, error=_choice_error(out)
                )
                yield chunk([end])
    if prep.include_usage:
        yield chunk([], tally.usage())


async def completion_stream(
    prep: Prepared, outputs: AsyncIterator[tuple[int, RequestOutput]], tally: Tally
) -> AsyncIterator[bytes]:
    def chunk(choices: list[r.CompletionChoice], usage: r.UsageInfo | None = None) -> bytes:
        return encode_event(
            r.CompletionStreamResponse(
                id=prep.response_id, created=prep.created, model=prep.model, choices=choices, usage=usage
            )
        )

    offsets = [len(prep.echo[i // prep.n]) for i in range(prep.num_choices)]  # logprobs' text_offset
    for i in range(prep.num_choices):
        if prep.echo[i // prep.n]:
            yield chunk([r.CompletionChoice(index=i, text=prep.echo[i // prep.n])])
    async with contextlib.aclosing(outputs):
        async for prompt, out in outputs:
            i = tally.add(prompt, out)
            lp = None
            if prep.logprobs and out.logprobs:
                lp = r.completion_logprobs(out.logprobs, offsets[i])
                offsets[i] += sum(len(t.token) for t in out.logprobs)
            if out.text or lp is not None:
                yield chunk([r.CompletionChoice(index=i, text=out.text, logprobs=lp)])
            if out.finish_reason is not None:
                reason = out.finish_reason.value
                yield chunk(
                    [r.CompletionChoice(index=i, text="", finish_reason=reason, error=_choice_error(out))]
                )
    if prep.include_usage:
        yield chunk([], tally.usage())


async def collect(
    prep: Prepared, outputs: AsyncIterator[tuple[int, RequestOutput]], tally: Tally
) -> r.ChatCompletionResponse | r.CompletionResponse:
    texts: list[list[str]] = [[prep.echo[i // prep.n]] for i in range(prep.num_choices)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(prep.num_choices)]
    scored: list[tuple[TokenLogprob, ...]] = [() for _ in range(prep.num_choices)]  # prompt tokens 1..
    ends: list[RequestOutput | None] = [None] * prep.num_choices
    async with contextlib.aclosing(outputs):
        async for prompt, out in outputs:
            i = tally.add(prompt, out)
            texts[i].append(out.text)
            logprobs[i].extend(out.logprobs)
            scored[i] = out.prompt_logprobs or scored[i]
            if out.finish_reason is not None:
                ends[i] = out
    usage = tally.usage()
    common: dict[str, Any] = {"id": prep.response_id, "created": prep.created, "model": prep.model}
    shown = [r.prompt_logprobs(s) if prep.show_prompt_logprobs else None for s in scored]
    if prep.kind == "chat":
        return r.ChatCompletionResponse(
            **common,
            usage=usage,
            choices=[
                _chat_choice(prep, i, "".join(texts[i]), logprobs[i], ends[i])
                for i in range(prep.num_choices)
            ],
            prompt_logprobs=shown[0],
        )
    return r.CompletionResponse(
        **common,
        usage=usage,
        choices=[
            r.CompletionChoice(
                index=i,
                text="".join(texts[i]),
                logprobs=_completion_logprobs(prep, i, scored[i], logprobs[i], len(texts[i][0])),
                finish_reason=ends[i].finish_reason.value if ends[i] else None,  # type: ignore[union-attr]
                error=_choice_error(ends[i]),
                prompt_logprobs=shown[i],
            )
            for i in range(prep.num_choices)
        ],
    )


def _completion_logprobs(
    prep: Prepared, i: int, scored: Sequence[TokenLogprob], logprobs: list[TokenLogprob], echo_len: int
) -> r.CompletionLogprobs | None:
    if not prep.logprobs:
        return None
    if prep.prompt_heads:  # echo: the prompt's tokens first, from offset 0
        return r.completion_logprobs([*scored, *logprobs], 0, prep.prompt_heads[i // prep.n])
    return r.completion_logprobs(logprobs, echo_len)


def _tool_parser(prep: Prepared) -> ToolCallParser | None:
    return PARSERS[prep.tool_parser]() if prep.tool_parser is not None else None


def _choice_error(out: RequestOutput | None) -> str | None:
    return out.error if out is not None and out.choice_error else None


def _finish_reason(out: RequestOutput, called: bool) -> str:
    """A choice that ended of itself after a tool call asks for the call: OpenAI's "tool_calls"."""
    assert out.finish_reason is not None
    return (
        FinishReason.TOOL_CALLS.value
        if called and out.finish_reason is FinishReason.STOP
        else out.finish_reason.value
    )


def _deltas(event: Event) -> list[r.DeltaMessage]:
    """Content as it is; a tool call as OpenAI streams one: id, type and name first, then arguments."""
    if isinstance(event, ContentEvent):
        return [r.DeltaMessage(content=event.text)]
    head = r.DeltaToolCall(
        index=event.index,
        id=event.id,
        type="function",
        function=r.DeltaFunctionCall(name=event.name, arguments=""),
    )
    args = r.DeltaToolCall(index=event.index, function=r.DeltaFunctionCall(arguments=event.arguments))
    return [r.DeltaMessage(tool_calls=[head]), r.DeltaMessage(tool_calls=[args])]


def _chat_choice(
    prep: Prepared, i: int, text: str, logprobs: list[TokenLogprob], end: RequestOutput | None
) -> r.ChatChoice:
    content: str | None = text
    calls: list[p.ToolCall] = []
    parser = _tool_parser(prep)
    if parser is not None:
        events = parser.feed(text) + parser.finish()
        content = "".join(e.text for e in events if isinstance(e, ContentEvent))
        calls = [
            p.ToolCall(id=e.id, function=p.FunctionCall(name=e.name, arguments=e.arguments))
            for e in events
            if isinstance(e, CallEvent)
        ]
        if calls and not content.strip():
            content = None  # as OpenAI: a reply that only calls tools has null content
    return r.ChatChoice(
        index=i,
        message=r.ChatMessage(content=content, tool_calls=calls or None),
        logprobs=r.chat_logprobs(logprobs) if prep.logprobs else None,
        finish_reason=_finish_reason(end, bool(calls)) if end is not None else None,  # type: ignore[arg-type]
        error=_choice_error(end),
    )
