"""Batched equals alone, bitwise, on every compute path this machine has: each ISA build of our
kernels and the torch path under each instruction set MKL offers here, at 1 and 2 threads.

Each point of the grid is a process of its own (tests/support/invariance_check.py), so the MKL setting and
the thread count take effect before torch loads. Why the grid: a rule that holds on one code path
only (MKL's AVX2 sgemm rounds rows alike at multiples of 4; its AVX-512 path does not) must fail
here on any machine, not only on the CPU that breaks it. `make test` runs a representative part;
the whole grid is marked slow (`make test-slow`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.kernels import available_isas
from tests.support.models import tiny_llama


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


MKL_ISAS = ["SSE4_2", "AVX", "AVX2"] + (["AVX512"] if "avx512f" in _cpu_flags() else [])
KERNEL_ISAS = available_isas()

# (kernels, MKL_ENABLE_INSTRUCTIONS or None, threads)
FULL = [(isa, None, t) for isa in KERNEL_ISAS for t in (1, 2)] + [
    ("torch", mkl, t) for mkl in MKL_ISAS for t in (1, 2)
]
QUICK = (
    [(isa, None, 2) for isa in KERNEL_ISAS]
    + [("avx2", None, 1)] * ("avx2" in KERNEL_ISAS)
    + [
        ("torch", MKL_ISAS[-1], 2),
        ("torch", "AVX2", 1),
        ("torch", "SSE4_2", 2),
    ]
)


def _id(p: tuple) -> str:
    kernels, mkl, threads = p
    return f"{kernels}-{mkl or 'default'}-{threads}t"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """GQA 4/2 tied, and 9/3 heads with head_dim 8, hidden 72 (not a multiple of 16), untied."""
    return [
        tiny_llama(tmp_path_factory),
        tiny_llama(tmp_path_factory, hidden=72, heads=9, kv_heads=3, head_dim=8, intermediate=100, tie=False),
    ]


def _run(model: Path, kernels: str, mkl: str | None, threads: int, dtypes: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_", "SHARDSERVE_"))}
    if mkl:
        env["MKL_ENABLE_INSTRUCTIONS"] = mkl
    cmd = [sys.executable, "-m", "tests.support.invariance_check", str(model), "--kernels", kernels,
           "--threads", str(threads), "--dtype", *dtypes]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} (MKL {mkl}):\n{out.stdout}{out.stderr[-3000:]}"
    assert out.stdout.startswith("ok:"), out.stdout


@pytest.mark.parametrize("point", QUICK, ids=_id)
def test_batched_equals_alone_on_each_path(models, point):
    kernels, mkl, threads = point
    for model in models:
        _run(model, kernels, mkl, threads, ["fp32", "bf16", "fp16", "int8"])


@pytest.mark.slow
@pytest.mark.parametrize("point", FULL, ids=_id)
def test_batched_equals_alone_on_the_whole_grid(models, point):
    kernels, mkl, threads = point
    for model in models:
        _run(model, kernels, mkl, threads, ["fp32", "bf16", "fp16", "int8"])


def test_the_check_catches_a_batch_dependent_linear(models, monkeypatch):
    """The checker itself: with the torch path's linears batched (one call for all rows, as before
    this rule), MKL rounds rows by batch size, and the check must say so."""
    from app.layers import quant
    from tests.support import invariance_check

    monkeypatch.setattr(quant, "rowwise", lambda fn, x: fn(x.contiguous()))
    problem = invariance_check.check(models[0], "fp32", "torch", 2)
    assert problem is not None and "differs" in problem
