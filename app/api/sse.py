"""The one place that writes Server-Sent Events: frames, keep-alives, errors, [DONE], disconnects.

Framing is ``data: <compact json>\\n\\n`` per event; compact JSON never holds a raw newline, so an
event is always one data line. Comments (``: ...``) keep proxies from closing an idle stream and are
ignored by SSE parsers, the openai client's included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from app.api.errors import APIError, error_body

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
MEDIA_TYPE = "text/event-stream"
# For the route's StreamingResponse: no caching, and no buffering by nginx-style proxies.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encode_event(event: BaseModel | dict[str, Any]) -> bytes:
    """One SSE event; models serialize through their own rules (responses omit OpenAI's absent nulls)."""
    if isinstance(event, BaseModel):
        payload = event.__pydantic_serializer__.to_json(event)
    else:
        payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return b"data: " + payload + b"\n\n"


def encode_error(exc: BaseException) -> bytes:
    """A ``data: {"error": {...}}`` event; the openai client raises APIError when it reads one."""
    return encode_event(error_body(exc))


async def sse_stream(
    events: AsyncIterator[bytes],
    *,
    keepalive_interval: float,
    is_disconnected: Callable[[], Awaitable[bool]],
    on_disconnect: Callable[[], None],
) -> AsyncIterator[bytes]:
    """Frames from events, keep-alives while idle, an error event on failure, then [DONE].

    on_disconnect runs once when the client is gone: found by polling is_disconnected (at most every
    keepalive_interval), or because the server cancelled or closed this generator before it finished
    (Starlette cancels the streaming task when the client disconnects). Nothing follows it.
    """
    iterator = aiter(events)
    pending: asyncio.Future[bytes] | None = None
    finished = False
    last_poll = time.monotonic()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            # wait() rather than wait_for(): a timeout must not cancel the producer mid-item.
            done, _ = await asyncio.wait({pending}, timeout=keepalive_interval)
            if time.monotonic() - last_poll >= keepalive_interval or not done:
                last_poll = time.monotonic()
                if await is_disconnected():
                    return  # finished stays False: the finally block reports the disconnect
            if not done:
                yield KEEPALIVE
                continue
            task, pending = pending, None
            try:
                frame = task.result()
            except StopAsyncIteration:
                break
            except Exception as exc:
                if not isinstance(exc, APIError):
                    logger.error("stream failed", exc_info=exc)
                finished = True
                yield encode_error(exc)
                yield DONE
                return
            yield frame
        finished = True
        yield DONE
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # the producer sees CancelledError, which also closes it
        else:
            if pending is not None and not pending.cancelled():
                pending.exception()  # retrieved: no "exception was never retrieved" warning
            # A producer suspended at a yield is closed now, not whenever the GC finds it: its
            # cleanup (the engine client's queue, the request's abort) must not wait for that.
            close = getattr(iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        if not finished:
            try:
                on_disconnect()
            except Exception:
                logger.exception("on_disconnect failed")
