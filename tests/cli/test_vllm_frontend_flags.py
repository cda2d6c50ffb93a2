"""vLLM's server flags we implement, from the command line, the environment and --config: list
flags taking several values (`--api-key K1 K2`) or a JSON list (`--allowed-origins '["*"]'`),
vLLM's names of our queue and shutdown flags, human-readable --max-model-len and
--kv-cache-memory-bytes; and real `serve` processes on TCP and on a Unix socket (--uds), driven
with httpx and the official openai client."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import openai
import pytest

from app.cli import main, parse_args
from app.device import Device
from app.model.loader import read_config
from app.settings import Settings
from app.stack import serving_limits
from tests.support.api_server import ServeProcess, wait_for
from tests.support.models import tiny_llama


def parse(*argv: str) -> Settings:
    return parse_args(["serve", *argv])[1]


def test_list_flags_take_several_values_repeats_and_json_lists() -> None:
    s = parse("org/m", "--api-key", "k1", "k2", "--api-key", "k3", "--served-model-name", "a", "b")
    assert (s.model, s.api_key, s.served_names, s.served_name) == (
        "org/m",
        ["k1", "k2", "k3"],
        ("a", "b"),
        "a",
    )
    s = parse("--allowed-origins", '["https://a.example", "https://b.example"]', "--allowed-methods", "GET", "POST",
              "--allowed-headers", '["Authorization"]', "--allowed-headers", "X-Custom")  # fmt: skip
    assert s.allowed_origins == ["https://a.example", "https://b.example"]
    assert (s.allowed_methods, s.allowed_headers) == (["GET", "POST"], ["Authorization", "X-Custom"])
    assert (parse().allowed_methods, parse().allowed_headers, parse().allow_credentials) == (
        ["*"],
        ["*"],
        False,
    )
    assert parse("--allowed-origins", "*").allowed_origins == ["*"]
    with pytest.raises(ValueError, match="not a JSON list"):
        parse("--allowed-origins", '["unclosed"')
    with pytest.raises(ValueError, match="empty"):
        parse("--served-model-name", " ")


def test_list_settings_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SHARDSERVE_SERVED_MODEL_NAME", "first,second")
    monkeypatch.setenv("SHARDSERVE_ALLOWED_ORIGINS", '["https://a.example"]')
    monkeypatch.setenv("SHARDSERVE_ALLOWED_METHODS", "GET, POST")
    monkeypatch.setenv("SHARDSERVE_MAX_MODEL_LEN", "2K")
    monkeypatch.setenv("SHARDSERVE_KV_CACHE_MEMORY_BYTES", "1.5g")
    s = Settings()
    assert s.served_names == ("first", "second") and s.allowed_origins == ["https://a.example"]
    assert (s.allowed_methods, s.max_model_len, s.kv_cache_memory_bytes) == (
        ["GET", "POST"],
        2048,
        1_500_000_000,
    )


def test_a_config_file_list_or_scalar_never_swallows_the_positional_model(tmp_path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("served-model-name: [a, b]\nallowed-origins: '[\"*\"]'\napi-key: k\n")
    s = parse("--config", str(cfg), "org/m")
    assert (s.model, s.served_names, s.allowed_origins, s.api_key) == ("org/m", ("a", "b"), ["*"], ["k"])
    cfg.write_text("max-num-queued-reqs: 3\nshutdown-timeout: 0\nmax-model-len: 1k\n")
    s = parse("--config", str(cfg))
    assert (s.max_queued_requests, s.shutdown_grace, s.max_model_len) == (3, 0.0, 1000)


def test_vllm_names_of_the_queue_and_shutdown_flags() -> None:
    s = parse("--max-num-queued-reqs", "5", "--max-num-queued-tokens", "900", "--shutdown-timeout", "2.5")
    assert (s.max_queued_requests, s.max_queued_tokens, s.shutdown_grace) == (5, 900, 2.5)
    ours = parse("--max-queued-requests", "5", "--max-queued-tokens", "900", "--shutdown-grace", "2.5")
    assert ours == s


@pytest.mark.parametrize(
    ("given", "tokens"),
    [("4096", 4096), ("1k", 1000), ("1K", 1024), ("25.6k", 25600), ("4.1k", 4100), ("2m", 2_000_000),
     ("2M", 2 * 2**20), (" 3k ", 3000), ("auto", None), ("AUTO", None), ("-1", None)],
)  # fmt: skip
def test_max_model_len_is_human_readable_as_in_vllm(given: str, tokens: int | None) -> None:
    assert parse("--max-model-len", given).max_model_len == tokens


@pytest.mark.parametrize(
    ("given", "says"),
    [("1.5K", "no fraction with a binary suffix"), ("12x", "valid integer"), ("8", "greater than or equal to 16"),
     ("-2", "greater than or equal to 16")],
)  # fmt: skip
def test_a_bad_max_model_len_is_one_line(given: str, says: str, capsys) -> None:
    assert main(["serve", f"--max-model-len={given}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shardserve: error: --max-model-len: ") and says in err and "\n" not in err


def test_kv_cache_memory_bytes_sizes_the_cache_without_reading_free_memory(
    tmp_path_factory, monkeypatch
) -> None:
    model = tiny_llama(tmp_path_factory)
    config = read_config(model)
    hf = json.loads((model / "config.json").read_text())
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    # K and V, every layer, fp32 (the torch path at --dtype fp32): the bytes of one 16-token block
    block_bytes = 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * head_dim * 4 * 16

    def unread(self: Device) -> int:
        raise AssertionError("free memory was read")

    monkeypatch.setattr(Device, "free_memory_bytes", unread)
    cpu = Device.resolve("cpu")

    def blocks(**kw: object) -> int:
        s = Settings(model=str(model), dtype="fp32", kernels="torch", block_size=16, **kw)
        return serving_limits(s, config, cpu)[1]

    assert blocks(kv_cache_memory_bytes="1M") == 2**20 // block_bytes
    assert blocks(kv_cache_memory_bytes="1m") == 1_000_000 // block_bytes
    assert blocks(kv_cache_memory_bytes=str(2**21)) == 2 * blocks(kv_cache_memory_bytes="1M")
    assert blocks(kv_cache_memory_bytes="1M", kv_cache_tokens=4096) == 4096 // 16  # tokens win
    # per rank, as vLLM's per GPU: at --tp 2 each rank holds one of the two KV heads, so twice the
    # tokens fit; at --tp 4 the heads are replicated, one per rank again, so no more than at --tp 2
    assert hf["num_key_value_heads"] == 2
    assert blocks(kv_cache_memory_bytes="1M", tp=2) == 2 * blocks(kv_cache_memory_bytes="1M")
    assert blocks(kv_cache_memory_bytes="1M", tp=4) == blocks(kv_cache_memory_bytes="1M", tp=2)
    with pytest.raises(ValueError, match="raise --kv-cache-memory-bytes"):
        blocks(kv_cache_memory_bytes=block_bytes)  # one block: less than one sequence of full context


def test_serve_with_vllm_frontend_flags(tmp_path_factory) -> None:
    """A vLLM-style command line: names, several keys, no docs, a human-readable context."""
    model = tiny_llama(tmp_path_factory, max_pos=4096)
    args = (str(model), "--dtype", "float32", "--served-model-name", "tiny", "tiny-2", "--api-key", "k1", "k2",
            "--disable-fastapi-docs", "--max-model-len", "1K", "--kv-cache-memory-bytes", "8M",
            "--max-num-queued-reqs", "4", "--shutdown-timeout", "5")  # fmt: skip
    with ServeProcess(*args) as srv:
        srv.wait_ready()
        for key in ("k1", "k2"):
            with openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0) as client:
                assert [m.id for m in client.models.list().data] == ["tiny", "tiny-2"]
                done = client.completions.create(model="tiny-2", prompt="a b", max_tokens=2)
                assert done.model == "tiny" and done.usage.completion_tokens == 2
                assert client.models.list().data[0].model_extra["max_model_len"] == 1024
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(srv.url + path).status_code == 404, path
    ready = next(ln for ln in srv.output.splitlines() if "ready: tiny " in ln)
    assert f"playground {srv.url}/" in ready and "/docs" not in ready and "context 1024" in ready
    assert "Traceback" not in srv.output


def _stale_socket(path: Path) -> None:
    """A socket file with nobody listening on it, as a killed server leaves behind."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def test_serve_on_a_unix_socket(tmp_path_factory, tmp_path) -> None:
    model = tiny_llama(tmp_path_factory)
    path = tmp_path / "shardserve.sock"
    _stale_socket(path)
    args = ("--model", str(model), "--dtype", "fp32", "--kv-cache-tokens", "1024", "--served-model-name", "tiny",
            "--uds", str(path))  # fmt: skip
    with ServeProcess(*args) as srv:
        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://local")

        def ready() -> bool:
            try:
                return http.get("/ready").status_code == 200
            except httpx.TransportError:
                return srv.proc.poll() is not None

        assert wait_for(ready, 120, 0.2) and srv.proc.poll() is None, srv.output[-3000:]
        assert srv.status("/health", timeout=0.5) is None  # nothing on TCP: --port is not listened on
        # a second server on the same socket is refused before it loads anything
        with ServeProcess(*args) as second:
            assert second.wait_exit(60) != 0
        assert "another server is listening there" in second.output
        # the first one still answers (the openai client closes the connection pool it is given)
        with openai.OpenAI(
            base_url="http://local/v1", api_key="x", http_client=http, max_retries=0
        ) as client:
            done = client.completions.create(model="tiny", prompt="a b", max_tokens=3)
            assert done.usage.completion_tokens == 3
    assert srv.proc.returncode == 0
    lines = srv.output.splitlines()
    assert any(f"listening on unix:{path} " in ln for ln in lines), srv.output
    ready_line = next(ln for ln in lines if "ready: tiny " in ln)
    assert ready_line.endswith(f"on the Unix socket {path}")
    assert not path.exists()  # removed on the way out
