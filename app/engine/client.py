"""The asyncio side of the engine: generate() yields a request's outputs, abort() cancels it.

Outputs cross from the engine thread in one batch per step (one call_soon_threadsafe), and are
fanned out here to per-request queues. Leaving generate() early — the client disconnected, the
task was cancelled — aborts the request in the engine, which frees its blocks at the next step
boundary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from app.engine.engine import Engine
from app.engine.types import EngineStats, GenerateRequest, RequestOutput


class EngineClient:
    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        on_request: Callable[[GenerateRequest], None] = lambda r: None,
    ) -> None:
        self.engine, self.loop, self.on_request = engine, loop, on_request
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Engine thread -> event loop; the engine's `on_outputs` hook."""
        self.loop.call_soon_threadsafe(self._fan_out, outputs)

    def _fan_out(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Every output of every choice, in order per choice; ends when all n choices finished."""
        if request.request_id in self._queues:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request.request_id] = q
        open_choices = request.sampling.n
        self.on_request(request)
        self.engine.add_request(request)
        try:
            while open_choices:
                out = await q.get()
                if out.finish_reason is not None:
                    open_choices -= 1
                yield out
        finally:
            del self._queues[request.request_id]
            if open_choices:
                self.engine.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)
