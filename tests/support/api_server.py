"""Helpers for the API tests: a started serving stack, and create_app() served by a real uvicorn in a
thread.

A real server (not an ASGI transport) because the openai client, SSE framing and client
disconnects are what these tests are about. Ranks are spawned processes, so a stack costs a few
seconds: test modules build one per module and share it between apps (SharedStack)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn
from fastapi import FastAPI

from app.api.card import ServedModel
from app.api.deps import ServerState
from app.api.server import create_app
from app.engine.types import RequestOutput, StepStats
from app.metrics import Metrics
from app.settings import Settings
from app.stack import Stack, build_stack, loader


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_settings(model: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "model": str(model),
        "dtype": "fp32",
        "kv_cache_tokens": 4096,
        "max_num_seqs": 8,
        "served_model_name": "tiny",
    }
    return Settings(**{**base, **kw})


class SharedStack:
    """A started stack that test apps take turns serving: its outputs, steps and rank reports go to
    whichever app (or test) loaded it last. Reads the Stack's attributes through (engine, pool...)."""

    def __init__(self, settings: Settings) -> None:
        self._deliver: Callable[[list[RequestOutput]], None] = lambda outs: None
        self._metrics: Metrics | None = None
        self.stack = build_stack(settings, on_outputs=self._on_outputs, on_step=self._on_step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stack, name)

    def _on_outputs(self, outs: list[RequestOutput]) -> None:
        if self._metrics is not None:
            self._metrics.observe_outputs(outs)
        self._deliver(outs)

    def _on_step(self, stats: StepStats) -> None:
        if self._metrics is not None:
            self._metrics.observe_step(stats)

    def deliver_to(self, deliver: Callable[[list[RequestOutput]], None]) -> None:
        """Outputs to `deliver` from now on, observed by no app's metrics (tests driving the engine)."""
        self._metrics, self._deliver = None, deliver

    def load(self, metrics: Metrics, deliver: Callable[[list[RequestOutput]], None]) -> Borrowed:
        """The API's Loader: the stack is already up; the app borrows it and never shuts it down."""
        self._metrics, self._deliver = metrics, deliver
        metrics.bind_engine(self.stack.engine.stats)
        self.stack.pool.metrics = metrics
        metrics.observe_ranks(self.stack.settings.tp, self.stack.pool.up, {})
        return Borrowed(self.stack)


class Borrowed:
    """A SharedStack as an app holds it: the same engine and card, and a shutdown that does nothing."""

    def __init__(self, stack: Stack) -> None:
        self.engine = stack.engine
        self.stack = stack

    @property
    def card(self) -> ServedModel:
        return self.stack.card

    def shutdown(self) -> None:
        pass


@contextlib.contextmanager
def started_stack(settings: Settings) -> Iterator[SharedStack]:
    shared = SharedStack(settings)
    shared.stack.start()
    try:
        yield shared
    finally:
        shared.stack.shutdown()


class LiveServer:
    """uvicorn serving `app` on a free loopback port, in a daemon thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on")
        config.timeout_graceful_shutdown = 2
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def state(self) -> ServerState:
        return self.app.state.shardserve

    def openai(self, api_key: str = "none", timeout: float = 60) -> openai.OpenAI:
        """The official client on this server, without retries (a test sees every failure)."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def live_app(settings: Settings, shared: SharedStack | None, **kw: Any) -> Iterator[LiveServer]:
    """create_app served live: on a started shared stack, or (None) loading its own as `serve` does."""
    load = shared.load if shared is not None else loader(settings)
    with LiveServer(create_app(settings, load, **kw)) as server:
        yield server


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def process_gone(pid: int) -> bool:
    """True once pid has exited (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def child_pids(pid: int) -> list[int]:
    found: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir() if task_dir.exists() else ():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def process_alive(pid: int) -> bool:
    """Whether a process still runs: a zombie still answers kill(pid, 0), but it is gone once reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


class ServeProcess:
    """`python -m app serve ARGS --port P` in a subprocess (a real server: its own socket, its
    connection handling, its CLI checks); its output is collected by a thread, so it never blocks."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, before: Sequence[str] = (), **popen: Any
    ) -> None:
        """args: serve's options; before: the CLI's own (--debug), which come before `serve`."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "app", *before, "serve", "--port", str(self.port), *args]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, **popen,
        )  # fmt: skip
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def status(self, path: str = "/ready", timeout: float = 2.0) -> int | None:
        try:
            return httpx.get(self.url + path, timeout=timeout).status_code
        except httpx.HTTPError:
            return None

    def wait_ready(self, timeout: float = 120.0) -> ServeProcess:
        ok = wait_for(lambda: self.proc.poll() is not None or self.status() == 200, timeout, 0.2)
        if not ok or self.proc.poll() is not None:
            self.stop()
            raise AssertionError(f"the server did not become ready:\n{self.output[-3000:]}")
        return self

    def wait_exit(self, timeout: float = 60.0) -> int:
        """The exit code, once the process ended and its output is read."""
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
