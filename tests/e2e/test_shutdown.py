"""Graceful shutdown of `python -m app serve` on SIGTERM: readiness and new requests answer 503 while
the socket stays open, a short in-flight stream completes, a long one is cut at --shutdown-grace
with a clean final event, the ranks stop and the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.support.api_server import child_pids, free_port, process_gone, wait_for
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(180)
GRACE = 3.0
LONG = 4000  # tokens: several seconds at the tiny model's best speed, so only the grace can end it


def stream_in_thread(url: str, body: dict, first: threading.Event) -> tuple[threading.Thread, list[bytes]]:
    raw: list[bytes] = []

    def run() -> None:
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            for piece in r.iter_raw():
                raw.append(piece)
                if b"data: {" in b"".join(raw):
                    first.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raw


def events(raw: list[bytes]) -> list[bytes]:
    return [e for e in b"".join(raw).split(b"\n\n") if e.startswith(b"data: ")]


def test_sigterm_drains_then_exits_zero(tmp_path_factory) -> None:
    model = tiny_llama(tmp_path_factory, max_pos=4096)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "app", "serve", "--model", str(model), "--dtype", "fp32", "--port", str(port),
           "--kv-cache-tokens", "8192", "--max-num-seqs", "4", "--served-model-name", "tiny",
           "--shutdown-grace", str(GRACE)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = wait_for(lambda: _status(url + "/ready") == 200, timeout=90, interval=0.2)
        assert ready, "the server never became ready"
        ranks = child_pids(proc.pid)
        assert ranks, "the ranks should be child processes"

        base = {"model": "tiny", "prompt": "Hi", "temperature": 0, "stream": True, "ignore_eos": True}
        short_first, long_first = threading.Event(), threading.Event()
        short, short_raw = stream_in_thread(url, {**base, "max_tokens": 8}, short_first)
        long, long_raw = stream_in_thread(url, {**base, "max_tokens": LONG}, long_first)
        assert short_first.wait(60) and long_first.wait(60)

        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert wait_for(lambda: _status(url + "/ready") == 503, timeout=5)
        r = httpx.post(
            url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}
        )  # the socket is still open
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert _status(url + "/health") == 200

        short.join(30)
        tail = events(short_raw)
        assert (
            tail[-1] == b"data: [DONE]"
            and json.loads(tail[-2][6:])["choices"][0]["finish_reason"] == "length"
        )

        long.join(30)
        cut = time.monotonic() - t0
        tail = events(long_raw)
        assert tail[-1] == b"data: [DONE]"
        error = json.loads(tail[-2][6:])["error"]
        assert "shutting down" in error["message"] and error["type"] == "server_error"
        assert len(tail) > 3  # partial output went out before the cut
        assert GRACE - 0.5 < cut < GRACE + 5

        assert proc.wait(30) == 0
        assert wait_for(lambda: all(process_gone(pid) for pid in ranks), timeout=10), "ranks left running"
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=10)[0]
    assert "draining" in out and "Traceback" not in out, out[-3000:]


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_failed_load_exits_nonzero(tmp_path) -> None:
    missing = tmp_path / "nope"
    missing.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--model", str(missing), "--port", str(free_port())],
        capture_output=True, text=True, timeout=90, env={**os.environ, "SHARDSERVE_LOG_LEVEL": "info"},
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-2000:]
    assert "failed to load" in r.stderr
