"""Typed exceptions and their OpenAI error objects; the only place errors become HTTP responses.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with the
status OpenAI would use, so the official clients raise their usual exception classes. Messages
never quote client input (prompts stay out of responses and logs) and never leak internals.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


class APIError(Exception):
    """Base of every error we answer on purpose; subclasses fix the status and OpenAI type."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    reject_reason: ClassVar[str | None] = None  # label of requests_rejected_total, None if not a rejection

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers: dict[str, str] = dict(headers or {})


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"
    reject_reason = "invalid"


class ContextTooLong(InvalidRequest):
    """The prompt, or prompt plus max_tokens, does not fit the context; worded like OpenAI's."""

    default_code = "context_length_exceeded"

    def __init__(
        self,
        max_model_len: int,
        prompt_tokens: int,
        completion_tokens: int | None = None,
        *,
        noun: str = "messages",
    ) -> None:
        if completion_tokens is None:
            message = (
                f"This model's maximum context length is {max_model_len} tokens. However, your {noun} "
                f"resulted in {prompt_tokens} tokens. Please reduce the length of the {noun}."
            )
        else:
            message = (
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the {noun}, "
                f"{completion_tokens} in the completion). Please reduce the length of the {noun} "
                "or completion."
            )
        super().__init__(message, param=noun)
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


class Unauthorized(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"
    reject_reason = "unauthorized"

    def __init__(
        self,
        message: str = "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
    ) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(APIError):
    """An unknown model (code model_not_found) or an endpoint we do not serve (unknown_url)."""

    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowed(APIError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeout(APIError):
    status_code = 408
    error_type = "timeout_error"
    default_code = "request_timeout"


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"
    reject_reason = "too_large"


class HeadersTooLarge(PayloadTooLarge):
    status_code = 431  # Request Header Fields Too Large
    default_code = "headers_too_large"


class QueueFull(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"
    reject_reason = "queue_full"

    def __init__(
        self,
        message: str = "The server is busy: too many queued requests. Retry later.",
        *,
        retry_after: float = 1.0,
    ) -> None:
        self.retry_after = max(1, math.ceil(retry_after))  # Retry-After takes whole seconds
        super().__init__(message, headers={"Retry-After": str(self.retry_after)})


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"
    reject_reason = "not_ready"

    def __init__(
        self, message: str = "The server is not available; retry later.", *, retry_after: float | None = None
    ) -> None:
        headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
        super().__init__(message, headers=headers)


class NotReady(ServiceUnavailable):
    default_code = "not_ready"

    def __init__(
        self, message: str = "The model is still loading; retry later.", *, retry_after: float | None = 5.0
    ) -> None:
        super().__init__(message, retry_after=retry_after)


class EngineFailed(APIError):
    status_code = 503
    error_type = "server_error"
    default_code = "engine_failed"

    def __init__(self, message: str = "The inference engine failed; retry later.") -> None:
        super().__init__(message)


def error_body(exc: BaseException) -> dict[str, Any]:
    """The OpenAI error object for exc; anything that is not an APIError becomes a generic 500."""
    if not isinstance(exc, APIError):
        return {
            "error": {"message": INTERNAL_ERROR_MESSAGE, "type": "server_error", "param": None, "code": None}
        }
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}


def error_response(exc: BaseException) -> JSONResponse:
    if isinstance(exc, APIError):
        return JSONResponse(error_body(exc), status_code=exc.status_code, headers=exc.headers)
    return JSONResponse(error_body(exc), status_code=500)


# ---- pydantic errors -> InvalidRequest ------------------------------------------------------------

_LOC_ROOTS = {"body", "query", "path", "header", "cookie"}


def _is_union_tag(part: str) -> bool:
    # pydantic inserts the failing union member ("list[int]", "literal['a']", "NamedToolChoice",
    # "function-after[...]") into loc; our field names are snake_case, so these are recognisable.
    return "[" in part or "-" in part or part[:1].isupper() or part in {"str", "int", "float", "bool", "none"}


def param_path(loc: Sequence[int | str]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    parts = list(loc)
    if parts and parts[0] in _LOC_ROOTS:
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_union_tag(part):
            continue
        elif not re.fullmatch(r"\w{1,64}", part, flags=re.ASCII):
            break  # a client's dict key: stop here rather than echo arbitrary input
        else:
            out += f".{part}" if out else part
    return out or None


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """The most specific pydantic error as a readable InvalidRequest naming the parameter; no input echoed."""
    if not errors:
        return InvalidRequest("Invalid request.")
    # A value failing a union yields one error per member; the deepest one is the member the client
    # meant (a list of parts with a bad part, rather than "should be a string").
    err = max(errors, key=lambda e: len(param_path(e.get("loc", ())) or ""))
    kind, loc, msg = err.get("type", ""), tuple(err.get("loc", ())), str(err.get("msg", "invalid value"))
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "invalid JSON")
        where = f" at position {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return InvalidRequest(
            f"We could not parse the JSON body of your request: {detail}{where}.", code="invalid_json"
        )
    param = param_path(loc)
    if param is None:
        if kind in ("missing", "model_attributes_type", "model_type", "dict_type"):
            return InvalidRequest("The request body must be a JSON object.", code="invalid_json")
        return InvalidRequest(msg.removeprefix("Value error, ") + ".")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequest(f"Invalid '{param}': {msg.removeprefix('Value error, ')}.", param=param)


def from_validation_error(exc: ValidationError | RequestValidationError) -> InvalidRequest:
    return from_validation_errors(exc.errors())


# ---- FastAPI wiring -------------------------------------------------------------------------------


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    # OpenAI answers 400 (never FastAPI's 422) and its clients map 400 to BadRequestError. A bare
    # pydantic ValidationError is deliberately not handled: raised in a route it is our bug (a 500).
    assert isinstance(exc, RequestValidationError)
    return error_response(from_validation_error(exc))


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status, headers = exc.status_code, dict(exc.headers or {})
    route = f"{request.method} {request.url.path}"
    if status == 404 and exc.detail == "Not Found":  # the router's own 404: no such route
        err: APIError = NotFound(f"Unknown route: {route} is not served here{_did_you_mean(request)}.",
                                 code="unknown_url")  # fmt: skip
    elif status == 404:
        err = NotFound(str(exc.detail))
    elif status == 405:
        err = MethodNotAllowed(f"Method not allowed: {route}.")
    elif status == 413:
        err = PayloadTooLarge(str(exc.detail))
    elif 400 <= status < 500:
        err = InvalidRequest(str(exc.detail))
    else:
        err = ServiceUnavailable(str(exc.detail)) if status == 503 else APIError(str(exc.detail))
    response = error_response(err)
    response.status_code = status
    response.headers.update(headers)  # e.g. Allow on 405
    return response


def _did_you_mean(request: Request) -> str:
    """A hint for a trailing slash (no redirect is made: see create_app)."""
    path = request.scope["path"]
    bare = path.rstrip("/")
    if path == bare:
        return ""
    scope = {**request.scope, "path": bare}
    if not any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
        return ""
    return f" (did you mean {bare}?)"


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(exc)


def install_handlers(app: FastAPI) -> None:
    """Map every error to an OpenAI error object: typed errors, validation (400), 404/405, then 500."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
