"""Rendering the engine's output: RequestOutputs -> OpenAI chunks (streamed) or one whole response,
for both endpoints, with usage, logprobs and tool calls read back from the text.

One Tally per request keeps usage, the access record and the admission ticket up to date from each
output; an output that ends the whole request (the ranks failed, the drain cut it short) raises
here, so the stream or the response turns it into the right error."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from app.api import responses as r
from app.api.backpressure import Ticket
from app.api.deps import AccessRecord
from app.api.errors import EngineFailed, ServiceUnavailable
from app.api.messages import FunctionCall, ToolCall
from app.api.prepare import Prepared
from app.api.sse import encode_event
from app.api.tool_parsers import PARSERS, CallEvent, ContentEvent, Event, ToolCallParser
from app.engine.client import EngineClient
from app.engine.types import FinishReason, GenerateRequest, RequestOutput, TokenLogprob

CUT_SHORT = "The server is shutting down; the request was cut short."


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
        # prompt_tokens_details only with --enable-prompt-tokens-details, as vLLM
        cached = sum(self.cached) if self.prep.prompt_tokens_details else None
        return r.UsageInfo.of(self.prep.prompt_tokens, sum(self.completion), cached)


def _chunker(
    prep: Prepared, cls: type[r.ChatCompletionStreamResponse] | type[r.CompletionStreamResponse]
) -> Callable[..., bytes]:
    """One SSE event of this request's stream: its choices, and usage on the last one."""

    def chunk(choices: list[Any], usage: r.UsageInfo | None = None) -> bytes:
        response = cls(
            id=prep.response_id, created=prep.created, model=prep.model, choices=choices, usage=usage
        )
        return encode_event(response)

    return chunk


async def chat_stream(
    prep: Prepared, outputs: AsyncIterator[tuple[int, RequestOutput]], tally: Tally
) -> AsyncIterator[bytes]:
    chunk = _chunker(prep, r.ChatCompletionStreamResponse)

    for i in range(prep.num_choices):  # the role first, as OpenAI does, before any token exists
        delta = r.DeltaMessage(role=prep.role, content=prep.echo[i // prep.n])
        yield chunk([r.ChatStreamChoice(index=i, delta=delta)])
    parsers = [_tool_parser(prep) for _ in range(prep.num_choices)]
    called = [False] * prep.num_choices
    async with contextlib.aclosing(outputs):
        async for prompt, out in outputs:
            i = tally.add(prompt, out)
            lp = r.chat_logprobs(out.logprobs, prep.tokens_as_ids) if prep.logprobs and out.logprobs else None
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
    chunk = _chunker(prep, r.CompletionStreamResponse)

    offsets = [len(prep.echo[i // prep.n]) for i in range(prep.num_choices)]  # logprobs' text_offset
    for i in range(prep.num_choices):
        if prep.echo[i // prep.n]:
            yield chunk([r.CompletionChoice(index=i, text=prep.echo[i // prep.n])])
    async with contextlib.aclosing(outputs):
        async for prompt, out in outputs:
            i = tally.add(prompt, out)
            lp = None
            if prep.logprobs and out.logprobs:
                lp = r.completion_logprobs(out.logprobs, offsets[i], as_ids=prep.tokens_as_ids)
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
        return r.completion_logprobs(
            [*scored, *logprobs], 0, prep.prompt_heads[i // prep.n], as_ids=prep.tokens_as_ids
        )
    return r.completion_logprobs(logprobs, echo_len, as_ids=prep.tokens_as_ids)


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
    calls: list[ToolCall] = []
    parser = _tool_parser(prep)
    if parser is not None:
        events = parser.feed(text) + parser.finish()
        content = "".join(e.text for e in events if isinstance(e, ContentEvent))
        calls = [
            ToolCall(id=e.id, function=FunctionCall(name=e.name, arguments=e.arguments))
            for e in events
            if isinstance(e, CallEvent)
        ]
        if calls and not content.strip():
            content = None  # as OpenAI: a reply that only calls tools has null content
    return r.ChatChoice(
        index=i,
        message=r.ChatMessage(role=prep.role, content=content, tool_calls=calls or None),
        logprobs=r.chat_logprobs(logprobs, prep.tokens_as_ids) if prep.logprobs else None,
        finish_reason=_finish_reason(end, bool(calls)) if end is not None else None,  # type: ignore[arg-type]
        error=_choice_error(end),
    )
