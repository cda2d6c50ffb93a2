"""`shardserve bench {serve,engine,kernels,structured,report,peers,accuracy}`: each target in its own module, imported on demand."""

from __future__ import annotations

import importlib

TARGETS = ("engine", "kernels", "serve", "structured", "report", "peers", "accuracy")


def bench_command(target: str, argv: list[str]) -> int:
    """Run app/bench/<target>.py's main(argv); a target whose module is not written yet says so."""
    if target not in TARGETS:
        raise ValueError(f"unknown bench target {target!r}; choose one of {', '.join(TARGETS)}")
    name = f"app.bench.{target}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # a missing dependency inside the module is a real error
            raise
        raise NotImplementedError(
            f"`shardserve bench {target}` is not built yet ({name} is missing)"
        ) from None
    return module.main(list(argv))
