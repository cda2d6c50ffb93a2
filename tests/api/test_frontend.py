"""vLLM's Frontend flags on a live app: several --served-model-name ids, --root-path,
--disable-fastapi-docs, --enable-request-id-headers and the CORS flags (--allowed-origins,
--allow-credentials, --allowed-methods, --allowed-headers), through the official openai client
and real HTTP requests (a browser's preflight included). One stack for the module, served by one
app per combination of flags."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api_server import LiveServer, SharedStack, live_app, started_stack, tiny_settings
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(180)
NAMES = ["tiny", "tiny-alias", "org/other"]
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def stack(model_dir) -> Iterator[SharedStack]:
    with started_stack(tiny_settings(model_dir, served_model_name=NAMES)) as shared:
        yield shared


def serving(stack: SharedStack, model_dir: Any, **kw: Any) -> Any:
    """A live app on the module's stack, with these settings over the stack's."""
    return live_app(tiny_settings(model_dir, served_model_name=NAMES, **kw), stack)


def test_every_served_name_is_listed_and_accepted_the_first_is_reported(stack, model_dir) -> None:
    with serving(stack, model_dir) as srv, srv.openai() as client:
        models = client.models.list().data
        assert [m.id for m in models] == NAMES
        for name in NAMES:
            done = client.completions.create(model=name, prompt="a b c", max_tokens=3, temperature=0)
            assert done.model == "tiny" and done.usage.completion_tokens == 3
            chat = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert chat.model == "tiny"
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="tiny-typo", prompt="a", max_tokens=1)
        message = info.value.body["message"]  # type: ignore[index]
        assert all(f"'{n}'" in message for n in NAMES), message
        tokens = httpx.post(srv.url + "/tokenize", json={"model": "org/other", "prompt": "a b"})
        assert tokens.status_code == 200 and tokens.json()["count"] > 0
        metrics = httpx.get(srv.url + "/metrics").text
    labels = {
        s.labels.get("model_name")
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if "model_name" in s.labels
    }
    assert labels == {"tiny"}


def test_root_path_behind_a_proxy_that_strips_it_or_not(stack, model_dir) -> None:
    with serving(stack, model_dir, root_path="/llm/") as srv, httpx.Client(base_url=srv.url) as h:
        # the proxy stripped the prefix, or forwarded the path whole: both reach the routes
        for path in ("/v1/models", "/llm/v1/models"):
            assert [m["id"] for m in h.get(path).json()["data"]] == NAMES, path
        # what a browser behind the proxy is told: the schema's server and the docs' schema URL
        assert h.get("/openapi.json").json()["servers"] == [{"url": "/llm"}]
        assert "'/llm/openapi.json'" in h.get("/docs").text
        with openai.OpenAI(base_url=srv.url + "/llm/v1", api_key="x", max_retries=0) as client:
            assert (
                client.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens == 2
            )


def test_disable_fastapi_docs_removes_the_docs_and_the_schema(stack, model_dir) -> None:
    with serving(stack, model_dir) as on, serving(stack, model_dir, disable_fastapi_docs=True) as off:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(on.url + path).status_code == 200, path
            gone = httpx.get(off.url + path)
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_url", path
        assert httpx.get(off.url + "/v1/models").status_code == 200


def test_request_id_headers_echo_the_clients_id_or_the_one_made(stack, model_dir) -> None:
    body = {"model": "tiny", "prompt": "a", "max_tokens": 1}
    with (
        serving(stack, model_dir, enable_request_id_headers=True) as srv,
        httpx.Client(base_url=srv.url) as h,
    ):
        assert (
            h.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-7"}).headers["x-request-id"]
            == "trace-7"
        )
        made = [h.post("/v1/completions", json=body).headers["x-request-id"] for _ in range(2)]
        assert made[0] != made[1] and all(len(m) >= 16 for m in made)
    with (
        serving(stack, model_dir, enable_request_id_headers=False) as srv,
        httpx.Client(base_url=srv.url) as h,
    ):
        r = h.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-8"})
        assert r.status_code == 200 and "x-request-id" not in r.headers


def preflight(server: LiveServer, method: str, headers: str, origin: str = ORIGIN) -> httpx.Response:
    return httpx.options(
        server.url + "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )


def test_cors_flags_as_vllm(stack, model_dir) -> None:
    # vLLM's defaults for methods and headers (any), credentials off
    with serving(stack, model_dir, allowed_origins='["https://app.example"]') as srv:
        ok = preflight(srv, "PUT", "x-custom, authorization")
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        assert "PUT" in ok.headers["access-control-allow-methods"]
        assert ok.headers["access-control-allow-headers"] == "x-custom, authorization"
        assert "access-control-allow-credentials" not in ok.headers
        assert preflight(srv, "POST", "authorization", origin="https://evil.example").status_code == 400
        get = httpx.get(srv.url + "/v1/models", headers={"Origin": ORIGIN})
        assert get.headers["access-control-allow-origin"] == ORIGIN
    # narrowed, with credentials: a browser may send cookies, and only what is listed
    narrow = {"allowed_origins": [ORIGIN], "allow_credentials": True, "allowed_methods": ["GET", "POST"],
              "allowed_headers": '["Authorization", "Content-Type"]'}  # fmt: skip
    with serving(stack, model_dir, **narrow) as srv:
        ok = preflight(srv, "POST", "authorization")
        assert ok.status_code == 200 and ok.headers["access-control-allow-credentials"] == "true"
        assert set(ok.headers["access-control-allow-methods"].split(", ")) >= {"GET", "POST"}
        assert "PUT" not in ok.headers["access-control-allow-methods"]
        assert preflight(srv, "PUT", "authorization").status_code == 400
        assert preflight(srv, "POST", "x-custom").status_code == 400
        sent = httpx.post(
            srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers={"Origin": ORIGIN}
        )
        assert sent.status_code == 200 and sent.headers["access-control-allow-credentials"] == "true"
        assert "X-Request-Id" in sent.headers["access-control-expose-headers"]
