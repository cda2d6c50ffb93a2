"""A real `shardserve serve` with API keys, probed where a careless client or an attacker would:
URLs with a trailing slash and a forged Host header, the API docs, and requests that cannot fit
the context or the KV cache."""

from __future__ import annotations

import httpx
import pytest

from tests.support.api_server import ServeProcess
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(180)
KEY = "sk-edges"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_llama(tmp_path_factory, max_pos=4096)
    args = ["--model", str(model), "--dtype", "fp32", "--served-model-name", "tiny", "--api-key", KEY,
            "--kv-cache-tokens", "1024", "--max-model-len", "1024"]  # fmt: skip
    with ServeProcess(*args) as srv:
        yield srv.wait_ready()


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/completions/"), ("POST", "/v1/chat/completions/"), ("GET", "/v1/models/"), ("GET", "/health/"),
     ("GET", "/docs/")],
)  # fmt: skip
def test_no_redirect_is_built_from_the_host_header(server, method, path) -> None:
    with httpx.Client(
        base_url=server.url, headers={**AUTH, "Host": "evil.example"}, follow_redirects=False
    ) as c:
        r = c.request(method, path, json={"prompt": "hi"} if method == "POST" else None)
    assert r.status_code == 404 and "location" not in r.headers, (r.status_code, r.headers)
    assert "evil.example" not in r.text
    error = r.json()["error"]
    assert error["code"] == "unknown_url" and f"did you mean {path.rstrip('/')}?" in error["message"]


def test_the_api_docs_stay_open_and_declare_the_bearer_scheme(server) -> None:
    with httpx.Client(base_url=server.url) as anon:  # no key, as vLLM: the docs are not secret
        assert anon.get("/v1/models").status_code == 401
        for page in ("/docs", "/redoc"):
            r = anon.get(page)
            assert r.status_code == 200 and "/openapi.json" in r.text, page
        schema = anon.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes == {
        "APIKey": {"type": "http", "scheme": "bearer", "description": schemes["APIKey"]["description"]}
    }
    for path, method in [("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
                         ("/tokenize", "post"), ("/detokenize", "post")]:  # fmt: skip
        assert schema["paths"][path][method]["security"] == [{"APIKey": []}], path
    for path in ("/health", "/ready", "/version"):  # open routes: "Authorize" sends nothing there
        assert "security" not in schema["paths"][path]["get"], path


def test_requests_that_cannot_fit_get_a_400_and_length_means_a_limit_was_reached(server) -> None:
    """The issue's probes at --kv-cache-tokens 1024: a 1,500-token prompt, a 1,230-token chat and
    900 tokens + max_tokens 200 each answered 200 with empty or cut output and `length`. With a
    cache that holds the whole context (start-up refuses a smaller one) each is a 400 naming the
    numbers, and what fits runs to its max_tokens."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        cases = [
            ("/v1/completions", {"prompt": [5] * 1500}, (1024, 1500)),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Paris " * 1230}]}, (1024,)),
            ("/v1/completions", {"prompt": [5] * 900, "max_tokens": 200}, (1024, 1100, 900, 200)),
            (
                "/v1/completions",
                {"prompt": [5] * 1001, "max_tokens": 24, "stream": True},
                (1024, 1025, 1001, 24),
            ),
        ]
        for path, body, numbers in cases:
            r = c.post(path, json={"model": "tiny", **body})
            assert r.status_code == 400, (body.keys(), r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["code"] == "context_length_exceeded", error
            assert all(str(n) in error["message"] for n in numbers), error["message"]
        r = c.post("/v1/completions", json={"prompt": [5] * 900, "max_tokens": 120, "ignore_eos": True})
        assert r.status_code == 200, r.text
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        assert r.status_code == 200 and choice["finish_reason"] == "length" and choice["text"]
        assert usage == {**usage, "prompt_tokens": 900, "completion_tokens": 120}
        # without max_tokens a chat may fill the rest of the context: `length` there means the context
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi " * 100}],
                                                 "ignore_eos": True})  # fmt: skip
        assert r.status_code == 200, r.text
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        assert r.status_code == 200 and choice["finish_reason"] == "length"
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 1024
