"""SSE framing, keep-alives, mid-stream errors and disconnects; the openai client is the parser of record."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Iterator

import httpx2
import openai
import pytest
from starlette.responses import StreamingResponse

from app.api import responses as r
from app.api import sse
from app.api.errors import INTERNAL_ERROR_MESSAGE, EngineFailed, QueueFull


def chunk(
    content: str | None = None, *, role: bool = False, finish: str | None = None
) -> r.ChatCompletionStreamResponse:
    delta = r.DeltaMessage(role="assistant" if role else None, content=content)
    return r.ChatCompletionStreamResponse(
        id="chatcmpl-abc",
        created=1700000000,
        model="smol",
        choices=[r.ChatStreamChoice(index=0, delta=delta, finish_reason=finish)],
    )  # type: ignore[arg-type]


def test_event_framing_is_exact() -> None:
    text = 'line1\nline2\r"q" é \u2028 end'
    expected = {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "smol",
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}],
    }
    frame = sse.encode_event(chunk(text))
    payload = json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()
    assert frame == b"data: " + payload + b"\n\n"
    # one event = one data line: no raw CR or LF before the terminating blank line
    assert b"\n" not in frame[:-2] and b"\r" not in frame


def test_dict_events_and_constants() -> None:
    assert sse.encode_event({"a": [1, None], "b": "ü"}) == b'data: {"a":[1,null],"b":"\xc3\xbc"}\n\n'
    with pytest.raises(ValueError):
        sse.encode_event({"x": float("nan")})  # never emit JSON that strict parsers reject
    assert sse.DONE == b"data: [DONE]\n\n"
    assert sse.KEEPALIVE == b": keep-alive\n\n"


def test_error_events() -> None:
    frame = sse.encode_error(QueueFull(retry_after=1))
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == {
        "error": {
            "message": QueueFull().message,
            "type": "rate_limit_error",
            "param": None,
            "code": "queue_full",
        }
    }
    generic = json.loads(sse.encode_error(RuntimeError("secret"))[6:])
    assert generic["error"]["message"] == INTERNAL_ERROR_MESSAGE


# ---- sse_stream -----------------------------------------------------------------------------------


class Probe:
    """Records what the stream did to its producer and to the disconnect hooks."""

    def __init__(self, disconnect_after_polls: int | None = None) -> None:
        self.disconnects = 0
        self.polls = 0
        self.producer_closed = False
        self.disconnect_after_polls = disconnect_after_polls

    async def is_disconnected(self) -> bool:
        self.polls += 1
        return self.disconnect_after_polls is not None and self.polls > self.disconnect_after_polls

    def on_disconnect(self) -> None:
        self.disconnects += 1

    def stream(self, events: AsyncIterator[bytes], interval: float = 0.02) -> AsyncIterator[bytes]:
        return sse.sse_stream(
            events,
            keepalive_interval=interval,
            is_disconnected=self.is_disconnected,
            on_disconnect=self.on_disconnect,
        )

    async def producer(
        self, frames: list[bytes], delay: float = 0.0, fail: Exception | None = None, forever: bool = False
    ) -> AsyncIterator[bytes]:
        try:
            for frame in frames:
                await asyncio.sleep(delay)
                yield frame
            while forever:
                await asyncio.sleep(delay)
                yield sse.encode_event({"tick": 1})
            if fail is not None:
                raise fail
        finally:
            self.producer_closed = True


async def collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [frame async for frame in stream]


def test_stream_ends_with_done() -> None:
    probe = Probe()
    frames = [sse.encode_event(chunk("a")), sse.encode_event(chunk("b"))]
    out = asyncio.run(collect(probe.stream(probe.producer(frames))))
    assert out == [*frames, sse.DONE] and probe.disconnects == 0 and probe.producer_closed


def test_keepalive_while_idle_without_cancelling_the_producer() -> None:
    probe = Probe()
    frame = sse.encode_event(chunk("late"))
    out = asyncio.run(collect(probe.stream(probe.producer([frame], delay=0.15), interval=0.02)))
    assert out[-2:] == [frame, sse.DONE]
    assert len(out) >= 4 and set(out[:-2]) == {sse.KEEPALIVE}  # the slow item still arrived intact
    assert probe.disconnects == 0


@pytest.mark.parametrize(
    "exc,message",
    [(EngineFailed(), EngineFailed().message), (RuntimeError("secret"), INTERNAL_ERROR_MESSAGE)],
)
def test_exception_mid_stream_becomes_error_event_then_done(
    exc: Exception, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()
    first = sse.encode_event(chunk("a"))
    with caplog.at_level(logging.ERROR, logger="app.api.sse"):
        out = asyncio.run(collect(probe.stream(probe.producer([first], fail=exc))))
    assert out[0] == first and out[2] == sse.DONE and len(out) == 3
    assert json.loads(out[1][len(b"data: ") :])["error"]["message"] == message
    assert probe.disconnects == 0
    assert any(r.exc_info for r in caplog.records) == isinstance(exc, RuntimeError)


def test_disconnect_found_by_polling_stops_without_done() -> None:
    probe = Probe(disconnect_after_polls=2)
    out = asyncio.run(collect(probe.stream(probe.producer([], delay=0.01, forever=True), interval=0.03)))
    assert sse.DONE not in out and probe.disconnects == 1
    assert probe.producer_closed  # its pending item was cancelled, which closed it


def test_consumer_closing_early_counts_as_disconnect() -> None:
    probe = Probe()

    async def main() -> None:
        stream = probe.stream(probe.producer([], delay=0.01, forever=True))
        assert await anext(stream)
        await stream.aclose()  # what the server does once the client is gone
        await asyncio.sleep(0.02)

    asyncio.run(main())
    assert probe.disconnects == 1


def test_cancellation_counts_as_disconnect() -> None:
    probe = Probe()

    async def main() -> None:
        stream = probe.stream(probe.producer([], delay=10.0, forever=True), interval=5.0)
        task = asyncio.create_task(collect(stream))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert probe.disconnects == 1 and probe.producer_closed


def test_starlette_client_disconnect_reaches_on_disconnect() -> None:
    """Through StreamingResponse as uvicorn drives it (ASGI spec 2.3): a disconnect message aborts."""
    probe = Probe()
    sent: list[bytes] = []

    async def main() -> None:
        response = StreamingResponse(
            probe.stream(probe.producer([], delay=0.01, forever=True), interval=1.0),
            media_type=sse.MEDIA_TYPE,
            headers=sse.HEADERS,
        )
        gone = asyncio.Event()

        async def receive() -> dict:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message.get("body", b""))
            if len(sent) > 3:
                gone.set()

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/"}
        await asyncio.wait_for(response(scope, receive, send), 5)
        await asyncio.sleep(0.02)

    asyncio.run(main())
    assert probe.disconnects == 1 and probe.producer_closed
    assert sse.DONE not in sent


# ---- the official client parses what we send -------------------------------------------------------


def stream_bytes(frames: list[bytes], fail: Exception | None = None) -> bytes:
    probe = Probe()

    async def main() -> list[bytes]:
        async def producer() -> AsyncIterator[bytes]:
            for i, frame in enumerate(frames):
                yield frame
                await asyncio.sleep(0.05 if i == 0 else 0)  # idle once: a keep-alive goes out
            if fail is not None:
                raise fail

        return await collect(probe.stream(producer(), interval=0.02))

    out = asyncio.run(main())
    assert sse.KEEPALIVE in out and out[-1] == sse.DONE
    return b"".join(out)


def openai_client(body: bytes) -> openai.OpenAI:
    def pieces() -> Iterator[bytes]:
        rng, i = random.Random(0), 0
        while i < len(body):  # arbitrary splits, mid-line and mid-UTF-8 sequence included
            n = rng.randint(1, 9)
            yield body[i : i + n]
            i += n

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": sse.MEDIA_TYPE, **sse.HEADERS}, content=pieces())

    return openai.OpenAI(
        base_url="http://t/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )


def test_openai_client_reads_chat_stream() -> None:
    frames = [
        chunk("", role=True),
        chunk("Bonjour"),
        chunk(" à\ntous"),
        chunk(None, finish="stop"),
        r.ChatCompletionStreamResponse(
            id="chatcmpl-abc", model="smol", choices=[], usage=r.UsageInfo.of(5, 3)
        ),
    ]
    client = openai_client(stream_bytes([sse.encode_event(f) for f in frames]))
    got = list(
        client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(got) == 5 and all(c.id == "chatcmpl-abc" and c.object == "chat.completion.chunk" for c in got)
    assert got[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in got[:4]) == "Bonjour à\ntous"
    assert [c.choices[0].finish_reason for c in got[:4]] == [None, None, None, "stop"]
    assert got[4].usage is not None and got[4].usage.total_tokens == 8 and got[4].choices == []


def test_openai_client_reads_completion_stream_with_our_finish_reasons() -> None:
    frames = [
        r.CompletionStreamResponse(
            id="cmpl-1", model="smol", choices=[r.CompletionChoice(index=i % 2, text=t, finish_reason=f)]
        )  # type: ignore[arg-type]
        for i, (t, f) in enumerate([("a", None), ("b", None), ("", "timeout"), ("", "length")])
    ]
    client = openai_client(stream_bytes([sse.encode_event(f) for f in frames]))
    got = list(client.completions.create(model="smol", prompt="x", stream=True, n=2))
    assert [(c.choices[0].index, c.choices[0].text, c.choices[0].finish_reason) for c in got] == [
        (0, "a", None),
        (1, "b", None),
        (0, "", "timeout"),
        (1, "", "length"),
    ]


def test_openai_client_raises_on_our_error_event() -> None:
    client = openai_client(stream_bytes([sse.encode_event(chunk("a"))], fail=EngineFailed()))
    stream = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    seen: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for c in stream:
            seen.append(c.choices[0].delta.content or "")
    assert seen == ["a"] and info.value.message == EngineFailed().message
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "engine_failed"
