"""The endpoints: thin adapters between HTTP and app/api/generation.py.

/v1/*, /tokenize, /detokenize and /tokenizer_info sit behind the API key; /health, /ready, /metrics,
/version, the playground and the API docs (/docs, /redoc, /openapi.json, as in vLLM) stay open for
probes, Prometheus and browsers. Routes we do not serve fall through to the router's 404, which
errors.py words as OpenAI does. Every parsed body's unknown fields are named (app/api/ignored.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from importlib import metadata, resources
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from app.api import constraints, sse
from app.api import protocol as p
from app.api import responses as r
from app.api.backpressure import Admission, Ticket
from app.api.deps import (
    AccessRecord,
    AdmissionDep,
    Authorized,
    BearerScheme,
    ClientDep,
    RecordDep,
    RuntimeDep,
    ServerState,
    StateDep,
    given_up,
)
from app.api.errors import EngineFailed, InvalidRequest, NotFound, NotReady, error_response
from app.api.generation import (
    Prepared,
    Tally,
    chat_stream,
    collect,
    completion_stream,
    outputs_of,
    prepare_chat,
    prepare_completion,
    template_kwargs,
)
from app.chat_template import ChatTemplateError
from app.engine.client import EngineClient
from app.runtime import Runtime

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


def _check_model(requested: str | None, runtime: Runtime) -> None:
    if requested is not None and requested != runtime.model_name:
        raise NotFound(
            f"The model does not exist here; this server serves '{runtime.model_name}'.",
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


async def _prepare(
    fn: Callable[[Any, Runtime, float], Prepared], body: Any, request: Request, runtime: Runtime
) -> Prepared:
    now = time.monotonic()
    large = int(request.headers.get("content-length") or 0) > INLINE_BODY_BYTES
    # a grammar may compile for tens of milliseconds the first time: not on the event loop
    constrained = any(getattr(body, f, None) is not None for f in _CONSTRAINED_BY)
    if large or constrained:
        return await asyncio.to_thread(fn, body, runtime, now)
    return fn(body, runtime, now)


async def _generate(
    prep: Prepared,
    request: Request,
    runtime: Runtime,
    client: EngineClient,
    admission: Admission,
    record: AccessRecord,
) -> Response:
    ids = tuple(r.request_id for r in prep.requests)
    ticket = admission.admit(ids, prep.num_choices, prep.prompt_tokens, time.monotonic())  # or 429 now
    if runtime.settings.log_prompts:  # off by default: prompts and outputs stay out of the logs
        prompts = [
            runtime.tokenizer.decode(r.prompt_token_ids, skip_special_tokens=False) for r in prep.requests
        ]
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
async def chat_completions(
    body: p.ChatCompletionRequest,
    request: Request,
    runtime: RuntimeDep,
    client: ClientDep,
    admission: AdmissionDep,
    record: RecordDep,
    state: StateDep,
) -> Response:
    _received(body, state, record)
    _check_model(body.model, runtime)
    prep = await _prepare(prepare_chat, body, request, runtime)
    return await _generate(prep, request, runtime, client, admission, record)


@api.post("/v1/completions", response_model=None, responses={200: {"model": r.CompletionResponse}})
async def completions(
    body: p.CompletionRequest,
    request: Request,
    runtime: RuntimeDep,
    client: ClientDep,
    admission: AdmissionDep,
    record: RecordDep,
    state: StateDep,
) -> Response:
    _received(body, state, record)
    _check_model(body.model, runtime)
    prep = await _prepare(prepare_completion, body, request, runtime)
    return await _generate(prep, request, runtime, client, admission, record)


# ---- models and tokens -------------------------------------------------------------------------


@api.get("/v1/models", response_model=r.ModelList)
async def list_models(runtime: RuntimeDep) -> Response:
    card = r.ModelCard(id=runtime.model_name, root=runtime.model_name, max_model_len=runtime.max_model_len)
    return _json(r.ModelList(data=[card]))


@api.post("/tokenize", response_model=r.TokenizeResponse)
async def tokenize(
    body: p.TokenizeRequest, runtime: RuntimeDep, record: RecordDep, state: StateDep
) -> Response:
    _received(body, state, record)
    _check_model(body.model, runtime)
    tok = runtime.tokenizer
    if body.messages is not None:
        try:
            text = tok.apply_chat_template(
                p.template_messages(body.messages),
                add_generation_prompt=body.add_generation_prompt,
                **template_kwargs(body.chat_template_kwargs),
            )
        except ChatTemplateError as e:
            raise InvalidRequest(f"{str(e)[:300]}.", param="messages") from None
        ids = tok.encode(text, add_special_tokens=bool(body.add_special_tokens))
    else:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = tok.encode(body.prompt or "", add_special_tokens=add)
    strs = [tok.token_text(i) for i in ids] if body.return_token_strs else None
    return _json(
        r.TokenizeResponse(count=len(ids), max_model_len=runtime.max_model_len, tokens=ids, token_strs=strs)
    )


@api.post("/detokenize", response_model=r.DetokenizeResponse)
async def detokenize(
    body: p.DetokenizeRequest, runtime: RuntimeDep, record: RecordDep, state: StateDep
) -> Response:
    _received(body, state, record)
    _check_model(body.model, runtime)
    tok = runtime.tokenizer
    vocab = min(tok.vocab_size, runtime.config.vocab_size)
    if body.tokens and max(body.tokens) >= vocab:
        raise InvalidRequest(
            f"Token id {max(body.tokens)} is outside the vocabulary (ids must be below {vocab}).",
            param="tokens",
        )
    return _json(r.DetokenizeResponse(prompt=tok.decode(body.tokens, skip_special_tokens=False)))


@api.get("/tokenizer_info")
async def tokenizer_info(runtime: RuntimeDep) -> dict[str, Any]:
    """vLLM's /tokenizer_info: the tokenizer's configuration as tokenizer_config.json holds it (the
    special tokens, the chat template, ...) and its class; lm-evaluation-harness's remote tokenizer
    reads it."""
    return runtime.tokenizer.config_info(runtime.max_model_len)


# ---- probes, metrics, the playground -----------------------------------------------------------


@public.get("/health")
async def health(state: StateDep) -> dict[str, str]:
    """Liveness: the process answers, unless the ranks are gone for good (a restart may help)."""
    if state.load_error is not None:
        raise EngineFailed("The model failed to load; restart the server.")
    if state.runtime is not None and state.runtime.engine.failed:
        raise EngineFailed(given_up(state.runtime))
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
    return {"version": v, "compute": state.runtime.compute if state.runtime is not None else "loading"}


@public.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = getattr(request.app.state, "metrics", None)  # set by app/metrics.py once it exists
    return Response(registry.render() if registry is not None else b"", media_type=CONTENT_TYPE_LATEST)


@public.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    page = resources.files("app").joinpath("static/playground.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
