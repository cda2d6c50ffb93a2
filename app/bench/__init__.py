"""`shardserve bench {serve,engine,kernels,structured,report,peers,accuracy}`: each target in its own module, imported on demand."""

from __future__ import annotations

import importlib

TARGETS = ("engine", "kernels", "serve", "structured", "report", "peers", "accuracy")


def bench_command(target: str, argv: list[str]) -> int:
    """Run app/bench/<target>.py's main(argv)."""
    if target not in TARGETS:
        raise ValueError(f"unknown bench target {target!r}; choose one of {', '.join(TARGETS)}")
    return importlib.import_module(f"app.bench.{target}").main(list(argv))
