"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads OpenMP: spinning OpenMP threads collapse on a shared, busy machine (see
# app/worker/pool.py); the tests' own reference computations get the same treatment as the ranks.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from app.model.store import DEFAULT_MODEL as DEFAULT_MODEL_NAME
from app.model.store import builtin_path, shardserve_home

DEFAULT_MODEL_ENV = "SHARDSERVE_DEFAULT_MODEL"
# where `shardserve download` (so `make model`) puts it: $SHARDSERVE_HOME, default ~/.cache/shardserve
DEFAULT_MODEL = str(builtin_path(DEFAULT_MODEL_NAME, shardserve_home()))


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct Q4_1); `make test` downloads it first."""
    path = Path(os.environ.get(DEFAULT_MODEL_ENV, DEFAULT_MODEL)).expanduser()
    if not path.is_file():
        pytest.skip(
            f"DEFAULT MODEL MISSING: {path} does not exist; run `make model` or set {DEFAULT_MODEL_ENV}"
        )
    return path


@pytest.fixture(scope="session")
def default_gguf_reader(default_model_path: Path):
    """One metadata parse of the default GGUF for the whole run: GGUFReader takes seconds on it."""
    import gguf

    return gguf.GGUFReader(str(default_model_path), "r")
