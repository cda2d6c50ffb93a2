"""Hostile and broken input, sent as raw bytes: each gets its documented 4xx as an OpenAI error
object, and a streamed request running the whole time meanwhile completes with the text it gives
alone. (Slow bodies, 413s by length and chunked, CORS and auth basics: tests/e2e/test_api_errors.py.)"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.support.api_server import live_app, started_stack, tiny_settings
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(240)
KEY = "sk-hostile"
JSON = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
MSG = [{"role": "user", "content": "hi"}]


def chat(**kw: object) -> bytes:
    return json.dumps({"messages": MSG, "max_tokens": 2, **kw}).encode()


def completion(**kw: object) -> bytes:
    return json.dumps({"prompt": "hi", "max_tokens": 2, **kw}).encode()


CASES = [  # (name, path, raw body, extra headers, status, expected in the message)
    ("invalid JSON", "/v1/completions", b'{"prompt": "x",', {}, 400, "parse"),
    ("not an object", "/v1/completions", b"[1, 2, 3]", {}, 400, "JSON object"),
    ("NaN", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', {}, 400, "finite"),
    (
        "Infinity",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
        {},
        400,
        "finite",
    ),
    (
        "-Infinity bias",
        "/v1/completions",
        b'{"prompt": "x", "logit_bias": {"3": -Infinity}}',
        {},
        400,
        "finite",
    ),
    ("wrong type", "/v1/completions", completion(max_tokens="5"), {}, 400, "integer"),
    (
        "wrong type in a list",
        "/v1/chat/completions",
        json.dumps({"messages": "hello"}).encode(),
        {},
        400,
        "messages",
    ),
    ("negative", "/v1/completions", completion(max_tokens=-1), {}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", completion(max_tokens=10**30), {}, 400, "context length"),
    ("huge n", "/v1/completions", completion(n=10**9), {}, 400, "'n'"),
    ("huge seed", "/v1/completions", completion(seed=10**30), {}, 400, "seed"),
    ("empty messages", "/v1/chat/completions", json.dumps({"messages": []}).encode(), {}, 400, "messages"),
    (
        "too many messages",
        "/v1/chat/completions",
        json.dumps({"messages": MSG * 1025}).encode(),
        {},
        400,
        "1024",
    ),
    (
        "null message",
        "/v1/chat/completions",
        json.dumps({"messages": [None]}).encode(),
        {},
        400,
        "messages[0]",
    ),
    (
        "unknown role",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
        {},
        400,
        "role",
    ),
    (
        "empty content parts",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": []}]}).encode(),
        {},
        400,
        "empty",
    ),
    ("lone surrogate", "/v1/completions", b'{"prompt": "a\\ud800b"}', {}, 400, "surrogate"),
    (
        "lone surrogate in chat",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        {},
        400,
        "surrogate",
    ),
    (
        "lone surrogate in stop",
        "/v1/completions",
        b'{"prompt": "x", "stop": ["\\ud83d"]}',
        {},
        400,
        "surrogate",
    ),
    ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe\xfd"}', {}, 400, "pars"),
    ("deep nesting", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, ""),
    ("id outside the vocabulary", "/v1/completions", completion(prompt=[5, 10**6]), {}, 400, "vocabulary"),
    ("negative id", "/v1/completions", completion(prompt=[-1]), {}, 400, "token ids"),
    ("boolean ids", "/v1/completions", completion(prompt=[True, False]), {}, 400, "token ids"),
    ("stop id outside", "/v1/completions", completion(stop_token_ids=[10**6]), {}, 400, "vocabulary"),
    ("bias id outside", "/v1/completions", completion(logit_bias={"999999": 1}), {}, 400, "vocabulary"),
    ("detokenize outside", "/detokenize", json.dumps({"tokens": [10**6]}).encode(), {}, 400, ""),
    ("10 MB body", "/v1/completions", b'{"prompt": "' + b"x" * (10 * 2**20) + b'"}', {}, 413, "limit"),
    ("headers too large", "/v1/completions", completion(), {"X-Filler": "a" * 100_000}, 431, "headers"),
    ("text/plain", "/v1/completions", completion(), {"Content-Type": "text/plain"}, 400, "JSON object"),
    ("no API key", "/v1/completions", completion(), {"Authorization": ""}, 401, "API key"),
    ("wrong API key", "/v1/completions", completion(), {"Authorization": "Bearer sk-wrong"}, 401, "API key"),
    ("wrong scheme", "/v1/completions", completion(), {"Authorization": f"Basic {KEY}"}, 401, "API key"),
    ("key without scheme", "/v1/completions", completion(), {"Authorization": KEY}, 401, "API key"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = tiny_settings(tiny_llama(tmp_path_factory), api_key=[KEY], max_request_bytes=2 * 2**20)
    with started_stack(settings) as stack, live_app(settings, stack) as srv:
        yield srv


def stream_text(url: str, out: list[str]) -> None:
    body = {
        "prompt": "The quick brown fox",
        "max_tokens": 120,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=JSON, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
    out.append(text)


def test_every_hostile_request_gets_its_4xx_while_others_are_served(server) -> None:
    alone: list[str] = []
    stream_text(server.url, alone)
    during: list[str] = []
    worker = threading.Thread(target=stream_text, args=(server.url, during))
    worker.start()
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name, path, body, headers, status, words in CASES:
            r = c.post(path, content=body, headers={**JSON, **headers})
            err = (
                r.json().get("error", {})
                if r.headers.get("content-type", "").startswith("application/json")
                else {}
            )
            if r.status_code != status or words.lower() not in err.get("message", "").lower():
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    worker.join(120)
    assert not failures, "\n".join(failures)
    assert during == alone and len(alone[0]) > 0  # the bystander was not disturbed
