"""Start and stop the servers `shardserve bench report` measures, each on a free loopback port.

Each server runs in its own session (process group), so stopping it also stops what it spawned
(our worker ranks, vLLM's engine core) and nothing else. Output goes to a log file per start."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.model.store import ensure_model
from app.settings import Settings

THREADS = "2"  # the machine's cores; every system gets the same
SLOT_CONTEXT = 1024  # llama-server's context per slot: the longest workload is 512 + 128 tokens


@dataclass(frozen=True)
class ServerSpec:
    system: str  # the name in the report: shardserve, llama.cpp, vLLM, naive
    argv: tuple[str, ...]
    ready_path: str  # 200 once the model is loaded
    startup_timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return " ".join(self.argv)


def default_model_file() -> Path:
    s = Settings()
    return ensure_model(s.model, s.home)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shardserve(model: Path, port: int, max_num_seqs: int, extra: tuple[str, ...] = ()) -> ServerSpec:
    argv = (sys.executable, "-m", "app", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--max-num-seqs", str(max_num_seqs), *extra)  # fmt: skip
    return ServerSpec("shardserve", argv, "/ready")


def llama(root: Path, model: Path, port: int, slots: int) -> ServerSpec:
    # -np slots as the concurrency tested, each with room for the longest workload (the set-up)
    argv = (str(root / "llama" / "bin" / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port",
            str(port), "-t", THREADS, "-cb", "--metrics", "-np", str(slots), "-c", str(slots * SLOT_CONTEXT),
            "--no-webui")  # fmt: skip
    return ServerSpec("llama.cpp", argv, "/health")


def vllm(root: Path, port: int, max_num_seqs: int) -> ServerSpec:
    argv = (str(root / "vllm" / "venv" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(root / "export"), "--served-model-name", "smollm2-fp32", "--dtype", "float32", "--host",
            "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs), "--max-model-len",
            str(SLOT_CONTEXT), "--seed", "0", *os.environ.get("VLLM_EXTRA_ARGS", "").split())  # fmt: skip
    # KV cache in GiB for the CPU backend; its default (4) is fine, but say it so runs compare
    env = {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
        "OMP_NUM_THREADS": THREADS,
    }
    return ServerSpec("vLLM", argv, "/health", startup_timeout_s=900.0, env=env)


def naive(root: Path, port: int) -> ServerSpec:
    argv = (sys.executable, "-m", "app.bench.naive_server", "--model", str(root / "export"), "--served-model-name",
            "smollm2-fp32", "--port", str(port), "--threads", THREADS)  # fmt: skip
    return ServerSpec("naive", argv, "/health")


@contextlib.contextmanager
def running(spec: ServerSpec, log_path: Path) -> Iterator[str]:
    """Start spec, wait until its ready path answers 200, yield its base URL, stop it."""
    port = spec.argv[spec.argv.index("--port") + 1]
    base = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {spec.command}\n".encode())
        log.flush()
        proc = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **spec.env}, start_new_session=True)  # fmt: skip
        try:
            _wait_ready(proc, base + spec.ready_path, spec.startup_timeout_s, log_path)
            yield base
        finally:
            stop(proc)


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"the server exited ({proc.returncode}) while starting:\n" + "\n".join(tail))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s; see {log_path}")


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the server's own process group, SIGKILL after grace_s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def versions(root: Path) -> dict[str, str]:
    """What ran, for the report: each system's version, or why it is unknown."""
    from importlib import metadata

    import torch

    out = {"shardserve": f"{_dist_version(metadata, 'shardserve')} (torch {torch.__version__})"}
    out["naive"] = f"transformers {_dist_version(metadata, 'transformers')} (torch {torch.__version__})"
    binary = root / "llama" / "bin" / "llama-server"
    if binary.exists():
        r = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        out["llama.cpp"] = " ".join((r.stdout + r.stderr).split())[:120] or "unknown"
    py = root / "vllm" / "venv" / "bin" / "python"
    if py.exists():
        code = "import importlib.metadata as m; print(m.version('vllm-cpu'), 'torch', m.version('torch'))"
        r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=60, check=False)
        out["vLLM"] = r.stdout.strip() or "unknown"
    return out


def _dist_version(metadata: object, name: str) -> str:
    try:
        return metadata.version(name)  # type: ignore[attr-defined]
    except Exception:
        return "unknown"
