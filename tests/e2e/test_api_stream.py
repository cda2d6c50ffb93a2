"""SSE on the wire, read with raw httpx: exact framing and tail order, keep-alives while queued, and
client disconnects that abort the engine request and free its KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import httpx
import pytest

from app.api import routes
from tests.support.api_server import live_app, started_stack, tiny_settings, wait_for
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(180)
LONG = 900  # tokens: seconds of work for the tiny model, so a request is surely still running


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = tiny_settings(tiny_llama(tmp_path_factory, max_pos=1024), max_num_seqs=4)
    with started_stack(settings) as stack, live_app(settings, stack) as srv:
        yield srv


def frames(raw: bytes) -> list[bytes]:
    """The events of a stream; asserts that it is nothing but whole `data:` events and comments."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    for e in events:
        assert b"\n" not in e and b"\r" not in e and (e.startswith(b"data: ") or e.startswith(b":")), e
    return [e for e in events if e.startswith(b"data: ")]


def compact(event: bytes) -> dict:
    """The JSON of an event, checking that it went out compact (what encode_event promises)."""
    obj = json.loads(event[6:])
    assert event[6:] == json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return obj


def test_chat_stream_framing_and_tail_order(server) -> None:
    body = {
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0,
        "n": 2, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip
    with httpx.Client(base_url=server.url) as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-request-id"]
        raw = b"".join(r.iter_raw())
    events = frames(raw)
    assert events[-1] == b"data: [DONE]"
    chunks = [compact(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    # the role first, for every choice
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:2]] == [
        (0, {"role": "assistant", "content": ""}),
        (1, {"role": "assistant", "content": ""}),
    ]
    # then per choice: content chunks, one finish chunk with an empty delta, nothing after it
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[2:-1] if c["choices"][0]["index"] == index]
        assert mine[-1] == {"index": index, "delta": {}, "logprobs": None, "finish_reason": "length"}
        assert all(ch["finish_reason"] is None and ch["delta"].keys() == {"content"} for ch in mine[:-1])
    assert all("usage" not in c for c in chunks[:-1])


def test_completion_stream_tail_without_usage(server) -> None:
    body = {
        "model": "tiny",
        "prompt": "Hello",
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=server.url) as h:
        raw = h.post("/v1/completions", json=body).content
    events = frames(raw)
    assert events[-1] == b"data: [DONE]"
    chunks = [compact(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "usage" not in chunks[-1]


def access_line(caplog, request_id: str) -> dict | None:
    for rec in caplog.records:
        if rec.name == "shardserve.access" and f'"id":"{request_id}"' in rec.getMessage():
            return json.loads(rec.getMessage())
    return None


def test_queued_stream_gets_keepalives_and_disconnects_free_every_block(server, caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="shardserve.access")
    monkeypatch.setattr(routes, "KEEPALIVE_INTERVAL", 0.05)
    engine = server.state.client.engine
    long = {
        "model": "tiny",
        "prompt": "Hi",
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }

    held: list = []

    async def run() -> bytes:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=60) as h,
            contextlib.AsyncExitStack() as stack,
        ):
            for i in range(4):  # every seat (max_num_seqs=4) held by a long stream
                r = await stack.enter_async_context(
                    h.stream("POST", "/v1/completions", json=long, headers={"X-Request-Id": f"hold-{i}"})
                )
                lines = r.aiter_lines()
                held.append(lines)  # a dropped iterator would be closed by the GC, and its stream with it
                while not (await anext(lines)).startswith("data: "):
                    pass
            queued = await stack.enter_async_context(
                h.stream("POST", "/v1/completions", json=long, headers={"X-Request-Id": "queued"})
            )
            seen = b""
            async for piece in queued.aiter_raw():
                seen += piece
                if b": keep-alive\n\n" in seen:
                    return seen
            raise AssertionError("the stream ended without a keep-alive")
        # leaving the stack closes all five connections mid-stream

    seen = asyncio.run(run())
    assert seen.startswith(b": keep-alive\n\n") and b"data:" not in seen  # still waiting for a seat
    assert wait_for(lambda: engine.block_manager.num_used_blocks == 0, timeout=10)
    assert wait_for(lambda: server.state.client.num_in_flight == 0 and not server.state.admission.in_flight)
    assert wait_for(lambda: all(access_line(caplog, f"hold-{i}") for i in range(4)))
    for i in range(4):
        line = access_line(caplog, f"hold-{i}")
        assert line["finish"] == "abort" and 0 < line["completion_tokens"] < LONG


def test_disconnect_during_a_whole_response_aborts_it(server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="shardserve.access")
    engine = server.state.client.engine
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url) as h, pytest.raises(httpx.ReadTimeout):
        h.post("/v1/completions", json=body, headers={"X-Request-Id": "impatient"}, timeout=0.5)
    assert wait_for(lambda: access_line(caplog, "impatient") is not None, timeout=10)
    line = access_line(caplog, "impatient")
    assert line["finish"] == "abort" and line["completion_tokens"] < LONG and line["status"] == 499
    assert wait_for(lambda: engine.block_manager.num_used_blocks == 0)
