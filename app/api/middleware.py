"""Pure ASGI middleware: request ids and the access log, and bounded request bodies.

Not BaseHTTPMiddleware: that one buffers streamed responses and hides client disconnects, and
both matter to SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import AccessRecord, ServerState
from app.api.errors import APIError, HeadersTooLarge, PayloadTooLarge, RequestTimeout, error_response
from app.api.ignored import HEADER as IGNORED_HEADER

access_log = logging.getLogger("shardserve.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=\-]{1,128}")  # a client's id is echoed only if it is this tame
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes: logged at debug level only
# uvicorn's httptools parser takes headers of any size (h11 stops at 64 KiB): bound them ourselves
MAX_HEADER_BYTES = 64 * 1024


class RequestContextMiddleware:
    """Accepts or makes X-Request-Id, echoes it (--enable-request-id-headers), and writes one JSON
    access-log line per request."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state
        self.echo_id = state.settings.enable_request_id_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        rid = given if given is not None and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        record = AccessRecord(rid, time.monotonic())
        scope.setdefault("state", {})["access"] = record
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if self.echo_id:
                    headers.append("X-Request-Id", rid)
                if record.ignored_fields is not None:
                    headers.append(IGNORED_HEADER, record.ignored_fields)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, record, status)

    def _log(self, scope: Scope, record: AccessRecord, status: int) -> None:
        metrics = self.state.metrics
        if record.reject_reason is not None:
            metrics.rejected.labels(record.reject_reason).inc()
        route = scope.get("route")  # the matched template keeps the label set bounded
        metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()
        quiet = scope["path"] in QUIET_PATHS
        if not access_log.isEnabledFor(logging.DEBUG if quiet else logging.INFO):
            return
        now = time.monotonic()
        first = record.first_output
        line = {
            "event": "request",
            "id": record.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "cached_tokens": record.cached_tokens,
            "queue_s": None if record.queue_time is None else round(record.queue_time, 4),
            "ttft_s": None if first is None else round(first - record.start, 4),
            "total_s": round(now - record.start, 4),
            "finish": record.finish_reason,
            "reject": record.reject_reason,
            **(record.texts or {}),
        }
        access_log.log(logging.DEBUG if quiet else logging.INFO, json.dumps(line, separators=(",", ":")))


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class BodyLimitMiddleware:
    """Reads a request body whole, within --max-request-bytes (413) and a deadline (408), then
    replays it; later receive() calls reach the server, so disconnects are still seen."""

    def __init__(self, app: ASGIApp, state: ServerState, read_timeout: float) -> None:
        self.app, self.state, self.read_timeout = app, state, read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            big = HeadersTooLarge(
                f"The request headers are larger than this server's limit of {MAX_HEADER_BYTES} bytes."
            )
            await self._reject(big, scope, receive, send)
            return
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.state.settings.max_request_bytes
        too_large = PayloadTooLarge(f"The request body is larger than this server's limit of {limit} bytes.")
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reject(too_large, scope, receive, send)  # before reading a byte of it
            return
        try:
            body = await asyncio.wait_for(self._read(receive, limit), self.read_timeout)
        except _TooLarge:
            await self._reject(too_large, scope, receive, send)
            return
        except asyncio.TimeoutError:
            timeout = RequestTimeout(f"The request body did not arrive within {self.read_timeout:g} seconds.")
            await self._reject(timeout, scope, receive, send)
            return
        except _ClientGone:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _read(receive: Receive, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _reject(exc: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        record = scope.get("state", {}).get("access")
        if record is not None:
            record.reject_reason = exc.reject_reason
        response = error_response(exc)
        response.headers["Connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)
