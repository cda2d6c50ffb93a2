"""`shardserve bench {serve,engine,kernels}`: each target in its own module, imported on demand."""

from __future__ import annotations

import importlib


def bench_command(target: str, argv: list[str]) -> int:
    module = importlib.import_module(f"app.bench.{target}")
    return module.main(list(argv))
