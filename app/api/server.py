"""create_app(settings): construction, middleware and routers; serve(settings): uvicorn and the drain.

The lifespan owns the serving stack, through the Loader the CLI hands over (app/api/card.py): it
loads the model in the background so that /health answers and /ready says 503 while the ranks
start, then keeps only the engine client and the model card. On SIGTERM/SIGINT serve() does not
let uvicorn close the socket at once: it drains first (readiness and new requests 503, in-flight
requests get --shutdown-grace seconds, then are cut short with a clean final event), and only then
stops uvicorn, whose lifespan shutdown stops the ranks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from app.api.backpressure import Admission
from app.api.card import Backend, Loader
from app.api.connections import ConnectionGuard, GuardedH11Protocol, quiet_accept_errors
from app.api.deps import ServerState
from app.api.errors import APIError, error_response, from_validation_error, install_handlers
from app.api.listen import BACKLOG, connection_budget, listen_on, raise_open_file_limit
from app.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.api.routes import api, public
from app.engine.client import EngineClient, OutputRouter
from app.engine.types import ExecutorFailure
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger("shardserve.server")
CUT_FLUSH_SECONDS = 2.0  # after the grace: time for cut-short requests to send their final event


def create_app(settings: Settings, loader: Loader, *, body_read_timeout: float = 30.0) -> FastAPI:
    """The app; its lifespan loads the model through `loader` and shuts the stack down at the end."""
    state = ServerState(
        settings,
        Admission(
            max_num_seqs=settings.max_num_seqs,
            max_queued_requests=settings.max_queued_requests,
            max_queued_tokens=settings.max_queued_tokens,
        ),
        api_keys=tuple(k.encode() for k in settings.api_key),
        metrics=Metrics(settings.served_name),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load(state, loader, OutputRouter(asyncio.get_running_loop())))
        try:
            yield
        finally:
            backend = await asyncio.shield(task)  # a thread cannot be interrupted: let the load finish
            if backend is not None:
                await asyncio.to_thread(backend.shutdown)

    # No redirect_slashes: Starlette builds that redirect's URL from the Host header, so
    # `POST /v1/completions/` with `Host: evil.example` answered 307 to evil.example; now a 404.
    docs = not settings.disable_fastapi_docs
    app = FastAPI(
        title="shardserve",
        summary="OpenAI-compatible model server",
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    # --root-path, set as vLLM sets it (the constructor's argument is deprecated, the attribute is
    # not): the app puts it in every request's scope, so the docs and the OpenAPI `servers` link
    # through the prefix, and the routes answer whether the proxy stripped it or not
    app.root_path = settings.root_path
    app.state.shardserve = state
    app.state.metrics = state.metrics
    _install_error_handlers(app)
    app.include_router(api)
    app.include_router(public)
    # added innermost first: the request id and access log see every response, CORS headers go on
    # errors too, and bodies are bounded before anything parses them
    app.add_middleware(BodyLimitMiddleware, state=state, read_timeout=body_read_timeout)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_credentials=settings.allow_credentials,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, state=state)
    return app


async def _load(state: ServerState, loader: Loader, router: OutputRouter) -> Backend | None:
    metrics = state.metrics
    try:
        backend = await asyncio.to_thread(loader, metrics, router.deliver)
    except Exception as e:  # a model that does not load ends the server, non-zero
        # one line that names the file and the problem; the traceback only with --debug
        known = isinstance(e, (ValueError, OSError, ExecutorFailure))
        log.error(
            "the model failed to load: %s", e if known else f"{type(e).__name__}: {e}", exc_info=state.debug
        )
        state.load_error = str(e)
        state.request_exit()
        return None
    card = backend.card
    state.client = EngineClient(backend.engine, router, on_request=metrics.request_added)
    state.card = card
    where = ""
    if state.url is not None:  # after Uvicorn's own start-up lines, which come before the model
        await state.listening.wait()
        if state.url.startswith("unix:"):  # no URL a browser could open
            where = f"; on the Unix socket {state.url.removeprefix('unix:')}"
        else:
            where = f"; playground {state.url}/"
            where += "" if state.settings.disable_fastapi_docs else f", API docs {state.url}/docs"
    log.info("ready: %s (%s, tp %d, context %d); compute: %s%s",
             card.name, card.dtype, card.tp, card.max_model_len, card.compute, where)  # fmt: skip
    return backend


def _install_error_handlers(app: FastAPI) -> None:
    """errors.py's handlers, plus a note of why a request was rejected (requests_rejected_total)."""
    install_handlers(app)

    def note(request: Request, reason: str | None) -> None:
        record = request.scope.get("state", {}).get("access")
        if record is not None and reason is not None:
            record.reject_reason = reason

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        note(request, getattr(exc, "reject_reason", None))
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        note(request, "invalid")
        return error_response(from_validation_error(exc))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


# ---- serve: uvicorn with a drain -----------------------------------------------------------------


class _DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT starts a drain; a second one cuts the grace short, a third
    stops waiting for open connections."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._cut = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # asyncio listen()s with the accept batch as the queue length too; a short kernel queue makes
        # a burst of clients wait a second for their SYN to be resent, and queued connections cost
        # no descriptor
        for sock in sockets or ():
            sock.listen(BACKLOG)
        self.state.listening.set()

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        quiet_accept_errors(self._loop)
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would close the socket now and re-raise the signal at exit (exit code != 0).
        if self._loop is None:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name)

    def _on_signal(self, name: str) -> None:
        if self._drain is None:
            log.info(
                "%s: draining (up to %.1fs for in-flight requests)", name, self.state.settings.shutdown_grace
            )
            self._drain = asyncio.ensure_future(self.drain())
        elif not self._cut.is_set():
            log.info("%s again: cutting in-flight requests short", name)
            self._cut.set()
        else:  # a third time: stop waiting for connections too, as uvicorn does on a second Ctrl+C
            self.force_exit = True

    async def drain(self) -> None:
        state, loop = self.state, asyncio.get_running_loop()
        state.admission.draining = True  # /ready and new requests answer 503 from now on
        deadline = loop.time() + state.settings.shutdown_grace
        while state.admission.in_flight and loop.time() < deadline and not self._cut.is_set():
            await asyncio.sleep(0.05)
        left = state.admission.in_flight
        if left and state.client is not None:
            log.warning("grace over: cutting %d in-flight request(s) short", len(left))
            for ticket in left:
                for rid in ticket.request_ids:
                    state.client.abort(rid)  # each ends with a final error event / a 503
            flush_until = loop.time() + CUT_FLUSH_SECONDS
            while state.admission.in_flight and loop.time() < flush_until:
                await asyncio.sleep(0.02)
        self.should_exit = True


def serve(
    settings: Settings,
    loader: Loader,
    sock: socket.socket | None = None,
    *,
    nofile: int | None = None,
    debug: bool = False,
) -> int:
    """Serve until SIGTERM/SIGINT and a drain; 0 on a clean stop, 1 if the model failed to load.

    `sock` is the listening socket if the caller bound it already (the CLI does, before importing
    this module, and checks what it can before the model loads), `nofile` the open-file limit it
    raised. Connections go through app/api/connections.py: a deadline for each request head, and
    a cap that closes idle connections first."""
    if nofile is None:
        nofile = raise_open_file_limit()
    if sock is None:
        sock = listen_on(settings.host, settings.port, settings.uds)
    app = create_app(settings, loader)
    state: ServerState = app.state.shardserve
    state.debug = debug
    cap, accept_batch = connection_budget(settings.max_connections, nofile)
    guard = ConnectionGuard(settings.request_head_timeout, cap)
    config = uvicorn.Config(
        app,
        lifespan="on",
        http=functools.partial(GuardedH11Protocol, guard=guard),  # type: ignore[arg-type]
        backlog=accept_batch,  # asyncio's accepts per wake-up; _DrainingServer restores the listen queue
        log_config=None,  # the CLI configured logging; uvicorn's loggers propagate to it
        access_log=False,  # ours is structured (RequestContextMiddleware)
        timeout_graceful_shutdown=CUT_FLUSH_SECONDS + 3,
    )
    server = _DrainingServer(config, state)
    state.request_exit = lambda: setattr(server, "should_exit", True)
    uds = sock.getsockname() if sock.family == socket.AF_UNIX else None
    if uds is not None:
        state.url = where = f"unix:{uds}"
    else:
        host, port = sock.getsockname()[:2]
        shown = "localhost" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
        state.url = f"http://{shown}:{port}"
        where = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    log.info(
        "listening on %s (at most %d connections, request heads within %gs); loading the model",
        where, guard.max_connections, guard.head_timeout,
    )  # fmt: skip
    t0 = time.monotonic()
    try:
        server.run(sockets=[sock])
    finally:
        if uds is not None:  # as uvicorn does: a socket file left behind would outlive the server
            with contextlib.suppress(OSError):
                os.unlink(uds)
    log.info("stopped after %.1fs", time.monotonic() - t0)
    return 1 if state.load_error is not None else 0
