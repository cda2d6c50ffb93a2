"""The endpoints: thin adapters between HTTP and the API's two nouns, preparing a request
(app/api/prepare.py) and rendering the engine's output (app/api/render.py).

/v1/*, /tokenize, /detokenize and /tokenizer_info sit behind the API key; /health, /ready, /metrics,
/version, the playground and the API docs (/docs, /redoc, /openapi.json, as in vLLM; none with
--disable-fastapi-docs) stay open for probes, Prometheus and browsers. Routes we do not serve fall
through to the router's 404, which errors.py words as OpenAI does. Every parsed body's unknown fields are named (app/api/ignored.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata, resources
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from app.api import constraints, sse
from app.api import protocol as p
from app.api import responses as r
from app.api.backpressure import Admission, Ticket
from app.api.card import ServedModel
from app.api.deps import (
    AccessRecord,
    AdmissionDep,
    Authorized,
    BearerScheme,
    CardDep,
    ClientDep,
    RecordDep,
    ServerState,
    StateDep,
)
from app.api.errors import EngineFailed, NotFound, NotReady, error_response
from app.api.messages import template_messages
from app.api.prepare import Prepared, check_vocab, prepare_chat, prepare_completion, render_chat
from app.api.render import Tally, chat_stream, collect, completion_stream, outputs_of
from app.engine.client import EngineClient
from app.settings import Settings

KEEPALIVE_INTERVAL = 10.0  # seconds between SSE comments while a request waits in the queue
INLINE_BODY_BYTES = 64 * 1024  # larger requests are tokenized off the event loop
T = TypeVar("T")
_CONSTRAINED_BY = (*constraints.FIELDS, "tools")

api = APIRouter(dependencies=[BearerScheme, Authorized])
public = APIRouter()


def _json(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.__pydantic_serializer__.to_json(model), status_code, media_type="application/json")


def _received(body: BaseModel, state: ServerState, record: AccessRecord) -> None:
    """Every parsed request body passes here: its unknown fields are logged and named in a header."""
    record.ignored_fields = state.ignored_fields.note(body)


def _check_model(requested: str | None, card: ServedModel) -> None:
    if requested is not None and requested not in card.names:
        served = ", ".join(f"'{n}'" for n in card.names)
        raise NotFound(
            f"The model does not exist here; this server serves {served}.",
            param="model",
            code="model_not_found",
        )


# ---- generation --------------------------------------------------------------------------------


class _TicketStream(StreamingResponse):
    """Releases the admission ticket however the stream ends, even if it never started."""

    def __init__(self, content: Any, ticket: Ticket) -> None:
        super().__init__(content, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release(time.monotonic())


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """work's result, or None (work cancelled, so the engine aborts) if the client leaves first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        watch.cancel()
        task.cancel()


@dataclass(frozen=True)
class _Generation:
    """What a generation endpoint needs besides its body; the dependencies answer 503 before any
    work while the model loads, the ranks restart or the server drains."""

    request: Request
    state: ServerState
    card: ServedModel
    client: EngineClient
    admission: Admission
    record: AccessRecord


def _generation(
    request: Request,
    state: StateDep,
    card: CardDep,
    client: ClientDep,
    admission: AdmissionDep,
    record: RecordDep,
) -> _Generation:
    return _Generation(request, state, card, client, admission, record)


GenerationDep = Annotated[_Generation, Depends(_generation)]


Preparer = Callable[[Any, ServedModel, Settings, float], Prepared]  # prepare_chat, prepare_completion


async def _prepare(fn: Preparer, body: Any, g: _Generation) -> Prepared:
    now = time.monotonic()
    large = int(g.request.headers.get("content-length") or 0) > INLINE_BODY_BYTES
    # a grammar may compile for tens of milliseconds the first time: not on the event loop
    constrained = any(getattr(body, f, None) is not None for f in _CONSTRAINED_BY)
    if large or constrained:
        return await asyncio.to_thread(fn, body, g.card, g.state.settings, now)
    return fn(body, g.card, g.state.settings, now)


async def _generate(fn: Preparer, body: Any, g: _Generation) -> Response:
    _received(body, g.state, g.record)
    _check_model(body.model, g.card)
    prep = await _prepare(fn, body, g)
    request, client, record = g.request, g.client, g.record
    ids = tuple(r.request_id for r in prep.requests)
    ticket = g.admission.admit(ids, prep.num_choices, prep.prompt_tokens, time.monotonic())  # or 429 now
    if g.state.settings.log_prompts:  # off by default: prompts and outputs stay out of the logs
        tok = g.card.tokenizer
        prompts = [tok.decode(r.prompt_token_ids, skip_special_tokens=False) for r in prep.requests]
        record.texts = {"prompts": prompts, "outputs": [""] * prep.num_choices}
    tally = Tally(prep, ticket, record)
    outputs = outputs_of(client, prep.requests)
    if prep.stream:
        events = (chat_stream if prep.kind == "chat" else completion_stream)(prep, outputs, tally)

        def on_disconnect() -> None:
            record.finish_reason = "abort"
            for rid in ids:
                client.abort(rid)

        frames = sse.sse_stream(
            events,
            keepalive_interval=KEEPALIVE_INTERVAL,
            is_disconnected=request.is_disconnected,
            on_disconnect=on_disconnect,
        )
        return _TicketStream(frames, ticket)
    try:
        response = await _until_disconnected(request, collect(prep, outputs, tally))
    finally:
        ticket.release(time.monotonic())
    if response is None:
        record.finish_reason = "abort"
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return _json(response)


@api.post("/v1/chat/completions", response_model=None, responses={200: {"model": r.ChatCompletionResponse}})
async def chat_completions(body: p.ChatCompletionRequest, g: GenerationDep) -> Response:
    return await _generate(prepare_chat, body, g)


@api.post("/v1/completions", response_model=None, responses={200: {"model": r.CompletionResponse}})
async def completions(body: p.CompletionRequest, g: GenerationDep) -> Response:
    return await _generate(prepare_completion, body, g)


# ---- models and tokens -------------------------------------------------------------------------


@api.get("/v1/models", response_model=r.ModelList)
async def list_models(card: CardDep) -> Response:
    # one card per served name, as vLLM's: each the same model (root), the reported name first
    models = [r.ModelCard(id=n, root=card.name, max_model_len=card.max_model_len) for n in card.names]
    return _json(r.ModelList(data=models))


@api.post("/tokenize", response_model=r.TokenizeResponse)
async def tokenize(body: p.TokenizeRequest, card: CardDep, record: RecordDep, state: StateDep) -> Response:
    _received(body, state, record)
    _check_model(body.model, card)
    tok = card.tokenizer
    if body.messages is not None:
        text = render_chat(
            tok, template_messages(body.messages), body, state.settings.default_chat_template_kwargs
        )
        ids = tok.encode(text, add_special_tokens=bool(body.add_special_tokens))
    else:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = tok.encode(body.prompt or "", add_special_tokens=add)
    strs = [tok.token_text(i) for i in ids] if body.return_token_strs else None
    return _json(
        r.TokenizeResponse(count=len(ids), max_model_len=card.max_model_len, tokens=ids, token_strs=strs)
    )


@api.post("/detokenize", response_model=r.DetokenizeResponse)
async def detokenize(
    body: p.DetokenizeRequest, card: CardDep, record: RecordDep, state: StateDep
) -> Response:
    _received(body, state, record)
    _check_model(body.model, card)
    check_vocab(body.tokens, card.vocab_size, "tokens")
    return _json(r.DetokenizeResponse(prompt=card.tokenizer.decode(body.tokens, skip_special_tokens=False)))


@api.get("/tokenizer_info")
async def tokenizer_info(card: CardDep) -> dict[str, Any]:
    """vLLM's /tokenizer_info: the tokenizer's configuration as tokenizer_config.json holds it (the
    special tokens, the chat template, ...) and its class; lm-evaluation-harness's remote tokenizer
    reads it."""
    return card.tokenizer.config_info(card.max_model_len)


# ---- probes, metrics, the playground -----------------------------------------------------------


@public.get("/health")
async def health(state: StateDep) -> dict[str, str]:
    """Liveness: the process answers, unless the ranks are gone for good (a restart may help)."""
    if state.load_error is not None:
        raise EngineFailed("The model failed to load; restart the server.")
    if state.card is not None and (health := state.card.health()).state == "failed":
        raise EngineFailed(health.reason)
    return {"status": "ok"}


@public.get("/ready", response_model=None)
async def ready(state: StateDep) -> Response:
    """Readiness: 200 only when the model is loaded, every rank is up and we are not draining."""
    reason = state.not_ready_reason()
    if reason is None:
        return Response(b'{"status":"ready"}', media_type="application/json")
    # returned, not raised: a probe saying "not yet" is not a rejected request
    return error_response(NotReady(f"Not ready: {reason}.", retry_after=None if reason == "draining" else 5))


@public.get("/version")
async def version(state: StateDep) -> dict[str, str]:
    """The package version and the compute path the ranks run (our C++ kernels or torch)."""
    try:
        v = metadata.version("shardserve")
    except metadata.PackageNotFoundError:
        v = "unknown"
    return {"version": v, "compute": state.card.compute if state.card is not None else "loading"}


@public.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = getattr(request.app.state, "metrics", None)  # set by app/metrics.py once it exists
    return Response(registry.render() if registry is not None else b"", media_type=CONTENT_TYPE_LATEST)


@public.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    page = resources.files("app").joinpath("static/playground.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
