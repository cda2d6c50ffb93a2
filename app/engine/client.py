"""The asyncio side of the engine: generate() yields a request's outputs, abort() cancels it.

Outputs cross from the engine thread in one batch per step (one call_soon_threadsafe, the
OutputRouter's deliver, which is the engine's on_outputs hook), and are fanned out to per-request
queues. The router exists before the engine (the engine is built with its deliver as a hook), the
client once both do. Leaving generate() early — the client disconnected, the task was cancelled —
aborts the request in the engine, which frees its blocks at the next step boundary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from app.engine.engine import Engine
from app.engine.types import EngineStats, GenerateRequest, RequestOutput


class OutputRouter:
    """Engine thread -> event loop: the queue of each request in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """The engine's `on_outputs` hook (engine thread)."""
        self.loop.call_soon_threadsafe(self._fan_out, outputs)

    def _fan_out(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def open(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = q
        return q

    def close(self, request_id: str) -> None:
        del self._queues[request_id]

    def __len__(self) -> int:
        return len(self._queues)


class EngineClient:
    def __init__(
        self,
        engine: Engine,
        router: OutputRouter,
        on_request: Callable[[GenerateRequest], None] = lambda r: None,
    ) -> None:
        self.engine, self.router, self.on_request = engine, router, on_request

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Every output of every choice, in order per choice; ends when all n choices finished."""
        q = self.router.open(request.request_id)
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
            self.router.close(request.request_id)
            if open_choices:
                self.engine.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def num_in_flight(self) -> int:
        return len(self.router)
