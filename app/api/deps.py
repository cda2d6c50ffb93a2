"""The app's state and the Annotated dependencies routes take; tests override them by key.

One ServerState per app, made by create_app and kept in ``app.state.shardserve``; nothing lives at
module level. The model card and the EngineClient appear once the model is loaded (the lifespan loads
it in the background, so probes answer 503 meanwhile)."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from app.api.backpressure import SHUTTING_DOWN, Admission
from app.api.card import ServedModel
from app.api.errors import EngineFailed, NotReady, ServiceUnavailable, Unauthorized
from app.api.ignored import IgnoredFields
from app.engine.client import EngineClient
from app.metrics import Metrics
from app.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    admission: Admission
    api_keys: tuple[bytes, ...] = ()
    card: ServedModel | None = None
    client: EngineClient | None = None
    load_error: str | None = None  # the model failed to load: serve() exits non-zero
    metrics: Metrics = field(default_factory=Metrics)  # the app's registry (/metrics)
    request_exit: Callable[[], None] = lambda: None  # serve() sets it: stops uvicorn (a failed load)
    debug: bool = False  # --debug: tracebacks in the log (a failed load)
    ignored_fields: IgnoredFields = field(default_factory=IgnoredFields)  # unknown names logged once
    url: str | None = None  # serve(): where it listens, for the "ready" line
    listening: asyncio.Event = field(default_factory=asyncio.Event)  # set once Uvicorn said it runs

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def not_ready_reason(self) -> str | None:
        """None when requests can be served; else why not (for /ready and the 503s)."""
        if self.draining:
            return "draining"
        if self.load_error is not None:
            return "the model failed to load"
        if self.card is None or self.client is None:
            return "loading"
        health = self.card.health()
        if health.state == "failed":
            return "the worker ranks failed and could not be restarted"
        if health.state == "restarting":
            return "the worker ranks are restarting"
        return None


def get_state(request: Request) -> ServerState:
    return request.app.state.shardserve


StateDep = Annotated[ServerState, Depends(get_state)]


def get_card(state: StateDep) -> ServedModel:
    """The served model (its tokenizer and limits); 503 while loading or draining."""
    if state.draining:
        raise ServiceUnavailable(SHUTTING_DOWN, retry_after=1)
    if state.card is None:
        raise NotReady()
    return state.card


CardDep = Annotated[ServedModel, Depends(get_card)]


def get_client(state: StateDep, card: CardDep) -> EngineClient:
    """The engine client, only while every rank is up: 503 otherwise, before any work is done."""
    reason = state.not_ready_reason()
    health = card.health()
    if health.state == "failed":
        raise EngineFailed(health.reason)
    if reason is not None or state.client is None:
        raise NotReady(f"The model is not ready ({reason}); retry later.")
    return state.client


ClientDep = Annotated[EngineClient, Depends(get_client)]


def get_admission(state: StateDep) -> Admission:
    return state.admission


AdmissionDep = Annotated[Admission, Depends(get_admission)]


# Declares the scheme in the OpenAPI schema, so that "Authorize" in /docs sends the key; the check
# itself is require_api_key's (constant-time, and an OpenAI error object rather than FastAPI's 403).
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="One of the server's --api-key values; needed only when the server has keys.",
)


def require_api_key(request: Request, state: StateDep) -> None:
    """With keys configured, `Authorization: Bearer <key>` must name one (constant-time per key)."""
    if not state.api_keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    ok = False
    for key in state.api_keys:  # no early exit: the time taken does not say which key came close
        ok |= hmac.compare_digest(given, key)
    if not ok or scheme.lower() != "bearer":
        raise Unauthorized()


Authorized = Depends(require_api_key)
BearerScheme = Security(BEARER)


@dataclass
class AccessRecord:
    """What the access log says about one request; the middleware makes it, routes fill it in."""

    request_id: str
    start: float  # time.monotonic() when the request arrived
    reject_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_output: float | None = None  # time.monotonic() of the first generated token
    queue_time: float | None = None  # seconds from arrival to the first scheduled step (engine's figure)
    finish_reason: str | None = None
    texts: dict[str, list[str]] | None = None  # prompts and outputs, only with --log-prompts
    ignored_fields: str | None = None  # unknown request fields, for the response header (ignored.py)


def get_record(request: Request) -> AccessRecord:
    record = request.scope.get("state", {}).get("access")
    if record is None:  # an app mounted without the request-id middleware
        record = AccessRecord(request_id="-", start=time.monotonic())
        request.scope.setdefault("state", {})["access"] = record
    return record


RecordDep = Annotated[AccessRecord, Depends(get_record)]
