"""What `shardserve serve` refuses at start-up, before any rank is spawned: each case is a real
process that must exit non-zero within seconds, with one line that says what is wrong and what to
do, no traceback, and nothing listening or left running."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.support.api_server import ServeProcess, child_pids
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(tmp_path_factory, max_pos=2048)


def refused(*args: str, env: dict[str, str] | None = None, within: float = 20.0) -> str:
    """Run serve, expect it to stop by itself, non-zero, before `within` seconds and with no
    child process; the one `shardserve: error:` line it printed."""
    srv = ServeProcess(*args, env=env)
    try:
        code = srv.wait_exit(within)
    finally:
        srv.stop()
    out = srv.output
    lines = [line for line in out.splitlines() if line.startswith("shardserve: error:")]
    assert code != 0 and len(lines) == 1, out[-3000:]
    assert "Traceback" not in out and "rank 0" not in out, out[-3000:]  # no rank was started
    assert srv.status("/health", timeout=0.5) is None  # nothing listens
    return lines[0]


@pytest.mark.parametrize(
    ("how", "args", "env"),
    [
        ("flag", ["--api-key", ""], {}),
        ("flag of spaces", ["--api-key", "sk-real", "--api-key", "  "], {}),
        ("environment", [], {"SHARDSERVE_API_KEY": " "}),
        ("environment, empty", [], {"SHARDSERVE_API_KEY": ""}),
        ("environment, an empty item", [], {"SHARDSERVE_API_KEY": "sk-a,,sk-b"}),
    ],
)
def test_an_empty_api_key_is_refused_however_given(model, how, args, env) -> None:
    line = refused("--model", str(model), *args, env=env)
    assert "API key is empty or only whitespace" in line and "--api-key" in line, (how, line)


def test_a_key_file_without_keys_is_refused(model, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("\n   \n\n")  # a secret mounted empty would otherwise switch authentication off
    line = refused("--model", str(model), "--api-key-file", str(keys))
    assert str(keys) in line and "no API key" in line


def test_keys_are_stripped_and_an_empty_bearer_token_is_refused(model, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-one\n\n  sk-two  \n")
    args = ["--model", str(model), "--dtype", "fp32", "--kv-cache-tokens", "4096", "--api-key-file", str(keys)]  # fmt: skip
    with ServeProcess(*args, env={"SHARDSERVE_API_KEY": " sk-three "}) as srv:
        srv.wait_ready()
        for header, status in [("Bearer ", 401), ("Bearer", 401), ("Bearer  ", 401), ("Bearer sk-one", 200),
                               ("Bearer sk-two", 200), ("Bearer sk-three", 200)]:  # fmt: skip
            # raw bytes: clients refuse to send a header value that ends in a space
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\n"
                          "Connection: close\r\n\r\n".encode())  # fmt: skip
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (header, answer[:300])
        assert httpx.get(srv.url + "/v1/models").status_code == 401


def test_a_busy_port_fails_at_once_with_nothing_spawned(model) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        srv = ServeProcess("--model", str(model), "--dtype", "fp32", "--port", str(port))
        pids = []
        while srv.proc.poll() is None and time.monotonic() - t0 < 20:
            pids += child_pids(srv.proc.pid)
            time.sleep(0.01)
        srv.wait_exit(20)
        elapsed = time.monotonic() - t0
    line = [ln for ln in srv.output.splitlines() if ln.startswith("shardserve: error:")]
    assert srv.proc.returncode == 1 and len(line) == 1, srv.output
    assert f"cannot listen on 127.0.0.1:{port}" in line[0] and "already in use" in line[0]
    assert "--port" in line[0] and "Traceback" not in srv.output and "ready: " not in srv.output
    assert not pids, pids  # no rank, not even briefly
    assert elapsed < 2.0, elapsed


@pytest.mark.parametrize(
    ("args", "context", "limit"),
    [
        ([], 2048, "the model's context of 2048"),
        (["--max-model-len", "1500"], 1500, "--max-model-len 1500"),
    ],
)
def test_a_kv_cache_smaller_than_the_context_is_refused_before_loading(model, args, context, limit) -> None:
    line = refused("--model", str(model), "--kv-cache-tokens", "1024", *args)
    assert f"--kv-cache-tokens 1024 is smaller than the context of {context} tokens ({limit})" in line
    assert f"Raise --kv-cache-tokens to {context} or more, or lower --max-model-len to 1024 or less" in line


def test_a_kv_cache_the_size_of_the_context_is_enough(model) -> None:
    args = ["--model", str(model), "--dtype", "fp32", "--kv-cache-tokens", "1024", "--max-model-len", "1024"]
    with ServeProcess(*args) as srv:
        srv.wait_ready()
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["max_model_len"] == 1024
