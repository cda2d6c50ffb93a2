"""What uvicorn lacks for connections: a deadline for each request's head, and a cap on open
connections that sheds those holding no request first.

uvicorn closes a keep-alive connection some seconds after its last response, but a connection that
never finishes a request head (a partial request line or headers, or no byte at all) stayed open
for ever, and nothing bounded how many there were: 250 of them under an open-file limit of 256
made accept() fail with EMFILE and /health time out. So, on top of uvicorn's h11 protocol:

- A request head (request line and headers) must be complete within --request-head-timeout of
  the connection opening, or of the first byte of a keep-alive connection's next request.
  Trickling bytes does not extend it. Past it: 408 and close if part of a head came, a silent
  close if nothing did (as for an idle keep-alive connection).
- At most `max_connections` are open. A connection beyond it closes the connection that has held
  no request the longest (no complete head yet, or idle between keep-alive requests), so whoever
  holds sockets without requests cannot lock anyone out, a liveness probe least of all. Only when
  every connection is busy with a request is the newcomer turned away: 503 and close, except the
  probes (/health, /ready), which are still answered.

h11 is chosen explicitly (not uvicorn's "auto", which takes httptools when it is installed): its
connection state says when a head is complete, and it bounds the head's size."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.api.errors import RequestTimeout, ServiceUnavailable, error_body

log = logging.getLogger("shardserve.connections")
PROBES = frozenset({"/health", "/ready"})  # answered even when every connection is busy
WARN_INTERVAL = 10.0  # seconds between warnings that the cap was reached


class ConnectionGuard:
    """The limits, and the connections of one server holding no request, longest idle first.

    Only the event loop touches it (protocol callbacks), so it needs no lock."""

    def __init__(self, head_timeout: float, max_connections: int) -> None:
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.open = 0
        self.idle: dict[GuardedH11Protocol, None] = {}  # insertion order: idle since
        self.evicted = 0  # closed to make room for a newer connection
        self.timed_out = 0  # closed for not sending a request head in time
        self.refused = 0  # answered 503: every connection was busy
        self._warned = float("-inf")

    def opened(self, conn: GuardedH11Protocol) -> bool:
        """Count a new connection, closing the longest idle one if that makes room; False when
        there is no room (every other connection is busy with a request)."""
        self.open += 1
        room = True
        if self.open > self.max_connections:
            victim = next(iter(self.idle), None)
            if victim is not None:
                self.evicted += 1
                self.forget(victim)
                victim.evict()
            else:
                self.refused += 1
                room = False
            self._warn()
        self.idle[conn] = None
        return room

    def forget(self, conn: GuardedH11Protocol) -> None:
        """conn no longer counts (closed, or being closed by us)."""
        if not conn.counted:
            return
        conn.counted = False
        self.open -= 1
        self.idle.pop(conn, None)

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_INTERVAL:
            self._warned = now
            log.warning(
                "%d connections open, the limit: closing the longest idle ones (%d so far); "
                "%d turned away because every connection was busy",
                self.open, self.evicted, self.refused,
            )  # fmt: skip


def _raw_response(status: int, reason: str, exc: Exception) -> bytes:
    body = json.dumps(error_body(exc)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the head deadline and the connection cap of a ConnectionGuard
    (made per connection by uvicorn; pass the guard with functools.partial)."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.counted = False
        self.head_timer: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.counted = True
        if not self.guard.opened(self):
            self.app = _turn_away(self.app)  # this connection's app only: uvicorn reads it per request
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the first bytes of the next request on a keep-alive connection
        super().data_received(data)
        self._update()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer, runs pipelined requests
        self._update()

    # ---- the guard's view ---------------------------------------------------------------------

    def _update(self) -> None:
        """Busy from a complete request head until its response is complete; idle otherwise."""
        if not self.counted or self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            self.guard.idle.setdefault(self, None)
        else:
            self.guard.idle.pop(self, None)
            self._cancel_head_timer()

    def evict(self) -> None:
        self._cancel_head_timer()
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.guard.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.guard.timed_out += 1
        self.guard.forget(self)
        if self.conn.trailing_data[0]:  # part of a head came: say why the connection closes
            late = RequestTimeout(
                f"The request line and headers did not arrive within {self.guard.head_timeout:g} seconds."
            )
            self.transport.write(_raw_response(408, "Request Timeout", late))
        self.transport.close()


def _turn_away(app: Any) -> Any:
    """The app for a connection over the cap: probes as usual, anything else 503 and close."""
    busy = ServiceUnavailable("The server has too many open connections; retry later.", retry_after=1)

    async def turn_away(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in PROBES:
            await app(scope, receive, send)
            return
        body = json.dumps(error_body(busy)).encode()
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return turn_away


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """If descriptors run out after all, asyncio logs a traceback for every failed accept() (a
    backlog's worth per wake-up on Python 3.11) and stops accepting for a second: say it once per
    WARN_INTERVAL instead, in one line."""
    last = float("-inf")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal last
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - last >= WARN_INTERVAL:
            last = now
            log.warning("accept() failed (%s): no new connection for a second", context.get("exception"))

    loop.set_exception_handler(handler)
