"""Every error status, provoked for real and checked as an OpenAI error object: 400, 401, 404, 405,
408, 413, 429 (+ Retry-After), 503 (draining, not ready, ranks failed mid-request). The engine must
see none of the requests the API rejects."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from app.api.backpressure import Admission
from app.api.card import ServedModel
from app.api.errors import QueueFull, ServiceUnavailable
from app.api.server import create_app
from app.engine.types import EngineStats, FinishReason, GenerateRequest, Health, RequestOutput
from app.metrics import Metrics
from app.tokenizer.tokenizer import Tokenizer
from tests.support.api_server import LiveServer, live_app, started_stack, tiny_settings, wait_for
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(180)
KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://playground.example"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory, max_pos=1024)


@pytest.fixture(scope="module")
def server(model_dir):
    settings = tiny_settings(
        model_dir, api_key=[KEY], max_num_seqs=2, max_queued_requests=1, max_request_bytes=16384,
        allowed_origins=[ORIGIN],
    )  # fmt: skip
    with started_stack(settings) as stack, live_app(settings, stack, body_read_timeout=0.5) as srv:
        yield srv


@pytest.fixture
def h(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture
def engine_calls(server, monkeypatch):
    """Every request the engine is given during the test."""
    engine = server.state.client.engine
    calls: list[GenerateRequest] = []
    real = engine.add_request

    def spy(request: GenerateRequest) -> None:
        calls.append(request)
        real(request)

    monkeypatch.setattr(engine, "add_request", spy)
    return calls


def rejected(server, reason: str) -> float:
    """requests_rejected_total{reason} as the server's registry holds it."""
    value = server.state.metrics.registry.get_sample_value(
        "shardserve_requests_rejected_total", {"reason": reason}
    )
    return value or 0.0


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body.keys() == {"error"} and body["error"].keys() == {"message", "type", "param", "code"}
    return body["error"]


def test_api_key_is_required_on_api_routes_only(server, h) -> None:
    before = rejected(server, "unauthorized")
    with httpx.Client(base_url=server.url) as anon:
        for path in ("/v1/models", "/tokenize"):
            err = error_of(
                anon.request("GET" if path == "/v1/models" else "POST", path, json={"prompt": "x"}), 401
            )
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        for bad in (f"Bearer {KEY}x", "Bearer", f"Basic {KEY}", KEY):
            r = anon.get("/v1/models", headers={"Authorization": bad})
            assert error_of(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        for path in ("/health", "/ready", "/version", "/metrics", "/"):
            assert anon.get(path).status_code == 200, path
    assert h.get("/v1/models").status_code == 200
    assert wait_for(lambda: rejected(server, "unauthorized") == before + 6)
    with (
        server.openai(api_key="wrong") as c,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        c.models.list()
    assert info.value.code == "invalid_api_key"


def test_context_too_long_names_the_numbers(h, engine_calls) -> None:
    err = error_of(h.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 1100}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert "1024" in err["message"] and "1100" in err["message"]
    err = error_of(h.post("/v1/completions", json={"prompt": [5] * 1000, "max_tokens": 100}), 400)
    assert all(str(n) in err["message"] for n in (1024, 1100, 1000, 100))
    long_chat = {"messages": [{"role": "user", "content": "Paris " * 1100}]}
    err = error_of(h.post("/v1/chat/completions", json=long_chat), 400)
    assert err["param"] == "messages" and "1024" in err["message"]
    assert engine_calls == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"n": 17}, "n"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"stop_token_ids": [5000]}, "stop_token_ids"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
        ),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
            "response_format",
        ),
    ],
)
def test_invalid_requests_are_400s_naming_the_parameter(h, engine_calls, body: dict, param: str) -> None:
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}
    err = error_of(h.post("/v1/chat/completions", json=request), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert engine_calls == []


def test_malformed_bodies_are_400s(h, server, engine_calls) -> None:
    invalid = rejected(server, "invalid")
    for content in (b"{not json", b"[1, 2]", b"", '"é"'.encode()):
        r = h.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and error_of(r, 400)["type"] == "invalid_request_error"
    assert error_of(h.post("/v1/completions", json={"model": "tiny"}), 400)["param"] == "prompt"
    assert wait_for(lambda: rejected(server, "invalid") == invalid + 5)
    assert engine_calls == []


def test_unknown_model_route_and_method(h, server) -> None:
    err = error_of(
        h.post(
            "/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
        ),
        404,
    )
    assert err["code"] == "model_not_found" and err["param"] == "model" and "tiny" in err["message"]
    for method, path in (
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/nothing"),
        ("GET", "/nope"),
    ):
        assert error_of(h.request(method, path, json={}), 404)["code"] == "unknown_url"
    assert error_of(h.get("/v1/chat/completions"), 405)["type"] == "invalid_request_error"
    with (
        server.openai(api_key=KEY) as c,
        pytest.raises(openai.NotFoundError),
    ):
        c.completions.create(model="gpt-9", prompt="hi")


def test_body_over_the_limit_is_413(h, server, engine_calls) -> None:
    before = rejected(server, "too_large")
    big = {"model": "tiny", "prompt": "x" * 20000}
    assert error_of(h.post("/v1/completions", json=big), 413)["code"] == "payload_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 1000
        yield b'{"prompt": "x"}'

    assert (
        error_of(
            h.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}), 413
        )["code"]
        == "payload_too_large"
    )
    assert wait_for(lambda: rejected(server, "too_large") == before + 2)
    assert engine_calls == []


def test_slow_body_is_408(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        s.sendall(head.encode() + b'{"prompt": ')
        t0 = time.monotonic()
        reply = b""
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in reply
    assert 0.4 < time.monotonic() - t0 < 5


def test_cors_headers_on_preflight_and_on_errors(h) -> None:
    pre = h.options(
        "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    r = h.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    assert (
        "access-control-allow-origin"
        not in h.get("/v1/models", headers={"Origin": "http://evil.example"}).headers
    )


def test_flooding_the_queue_gives_429s_and_admitted_requests_complete(server) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 64, "temperature": 0, "ignore_eos": True}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as ac:
            return await asyncio.gather(*(ac.post("/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(flood())
    ok = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(busy) == 8 and len(busy) >= 1 and len(ok) >= 2
    for r in busy:
        err = error_of(r, 429)
        assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
    texts = {r.json()["choices"][0]["text"] for r in ok}
    assert len(texts) == 1 and all(r.json()["usage"]["completion_tokens"] == 64 for r in ok)
    assert wait_for(lambda: rejected(server, "queue_full") >= len(busy))


def test_draining_answers_503(h, server) -> None:
    server.state.admission.draining = True
    try:
        assert error_of(h.get("/ready"), 503)["code"] == "not_ready"
        err = error_of(h.post("/v1/completions", json={"prompt": "hi"}), 503)
        assert "shutting down" in err["message"] and err["type"] == "server_error"
        assert h.get("/health").status_code == 200
    finally:
        server.state.admission.draining = False
    assert h.get("/ready").status_code == 200


# ---- a backend whose ranks fail: an engine stand-in that answers one token, then ERROR ----------


class FailingEngine:
    def __init__(self) -> None:
        self.hooks = SimpleNamespace(on_outputs=lambda outputs: None)

    def add_request(self, req: GenerateRequest) -> None:
        n, plen = req.sampling.n, len(req.prompt_token_ids)
        self.hooks.on_outputs(
            [
                RequestOutput(req.request_id, i, "Hel", (5,), prompt_tokens=plen, completion_tokens=1)
                for i in range(n)
            ]
        )
        self.hooks.on_outputs([
            RequestOutput(req.request_id, i, "", (), finish_reason=FinishReason.ERROR, prompt_tokens=plen,
                          completion_tokens=1, error="the model's worker ranks failed: rank 1 died (exit code -9)")
            for i in range(n)
        ])  # fmt: skip

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats()


class FailingBackend:
    """What the API gets from a loader: an engine (the stand-in) and a card whose health the test sets."""

    def __init__(self, model_dir: Path) -> None:
        self.engine = FailingEngine()
        self.health = Health("up")
        self.card = ServedModel(
            name="tiny", architecture="llama", dtype="fp32", tp=1, max_model_len=1024, vocab_size=320,
            tokenizer=Tokenizer.load(model_dir), grammars=None, compute="torch", health=lambda: self.health,  # type: ignore[arg-type]
        )  # fmt: skip

    def load(self, metrics: Metrics, deliver: Callable[[list[RequestOutput]], None]) -> FailingBackend:
        self.engine.hooks.on_outputs = deliver
        return self

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def failing(model_dir):
    backend = FailingBackend(model_dir)
    with LiveServer(create_app(tiny_settings(model_dir), backend.load)) as srv:  # type: ignore[arg-type]
        yield srv, backend


def test_ranks_failing_mid_request(failing) -> None:
    srv, _ = failing
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with httpx.Client(base_url=srv.url) as c:
        err = error_of(c.post("/v1/chat/completions", json=chat), 503)
        assert err["code"] == "engine_failed" and "rank 1 died" in err["message"]
        raw = c.post("/v1/chat/completions", json={**chat, "stream": True}).content
    events = raw.split(b"\n\n")
    assert events[-3:] == [events[-3], b"data: [DONE]", b""] and b'"code":"engine_failed"' in events[-3]
    assert b'"content":"Hel"' in raw
    with (
        srv.openai(api_key="x") as oc,
        pytest.raises(openai.APIError, match="rank 1 died"),
    ):
        for _ in oc.chat.completions.create(model="tiny", messages=chat["messages"], stream=True):
            pass


def test_not_ready_and_failed_for_good(failing) -> None:
    srv, backend = failing
    body = {"prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=srv.url) as c:
        backend.health = Health("restarting")  # what a pool restart looks like
        try:
            assert error_of(c.get("/ready"), 503)["code"] == "not_ready"
            r = c.post("/v1/completions", json=body)
            assert error_of(r, 503)["code"] == "not_ready" and int(r.headers["retry-after"]) >= 1
            assert c.get("/health").status_code == 200
        finally:
            backend.health = Health("up")
        backend.health = Health("failed", "The model's worker ranks failed (rank 0 died)")  # given up
        try:
            err = error_of(c.get("/health"), 503)
            assert err["code"] == "engine_failed" and "rank 0 died" in err["message"]
            assert error_of(c.post("/v1/completions", json=body), 503)["code"] == "engine_failed"
        finally:
            backend.health = Health("up")
        assert c.get("/ready").status_code == 200


def test_admission_counts_waiting_requests_by_seats_and_tokens() -> None:
    adm = Admission(max_num_seqs=4, max_queued_requests=2, max_queued_tokens=100)
    a = adm.admit(("a",), 3, 10, 0.0)  # seats free: runs at once
    b = adm.admit(("b",), 1, 10, 0.0)
    assert adm.waiting() == (0, 0)
    c = adm.admit(("c",), 2, 60, 0.0)  # no seat left: waits
    d = adm.admit(("d",), 1, 30, 0.0)  # FCFS: waits behind c even though nothing frees first
    assert adm.waiting() == (2, 90)
    with pytest.raises(QueueFull) as info:
        adm.admit(("e",), 1, 1, 0.0)
    assert info.value.status_code == 429 and int(info.value.headers["Retry-After"]) >= 1
    a.start()
    a.release(1.0)
    a.release(2.0)  # idempotent
    assert adm.waiting() == (0, 0)  # c and d fit in the seats a gave back
    with pytest.raises(QueueFull, match="tokens"):
        for t in (b, c, d):
            t.start()
        adm.admit(("f",), 4, 150, 0.0)  # would wait: alone, over the token budget is still admitted
        adm.admit(("g",), 1, 60, 0.0)  # a second waiter over the budget is not
    adm.draining = True
    with pytest.raises(ServiceUnavailable):
        adm.admit(("h",), 1, 1, 0.0)
    assert {t.request_ids for t in adm.in_flight} == {("b",), ("c",), ("d",), ("f",)}
