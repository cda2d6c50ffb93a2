"""The server's sampling defaults, as vLLM's `--generation-config` and `--override-generation-config`.

A request that leaves temperature, top_p, ... unset samples with the model's own defaults (its
authors tuned them: SmolLM2 at OpenAI's temperature 1.0 rambles), then OpenAI's. vLLM reads them
from generation_config.json (`auto`), or not at all (`vllm`), or from another directory; an
override JSON goes on top. A GGUF carries no generation config, so a built-in model's registry
entry carries the defaults of its model card. The request side reads the result from
`Tokenizer.generation_defaults` (app/api/prepare.py picks client value, then these, then OpenAI's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from app.model.errors import reading_model
from app.settings import GENERATION_KEYS


def read_generation_config(directory: Path) -> dict[str, float]:
    """The sampling keys of `directory`/generation_config.json; {} when there is none."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return {}
    with reading_model(path):
        data = dict(json.loads(path.read_text(encoding="utf-8")))
    number = (int, float)
    return {k: v for k in GENERATION_KEYS if isinstance(v := data.get(k), number) and not isinstance(v, bool)}


def sampling_defaults(
    choice: str, override: Mapping[str, float], model_path: Path, builtin: Mapping[str, float] | None = None
) -> tuple[dict[str, float], str]:
    """(defaults by sampling-parameter name, where they come from) for `--generation-config choice`.

    `builtin`: the built-in model entry's defaults, used by `auto` for a GGUF of that model."""
    if choice == "vllm":
        gen, source = {}, "none (--generation-config vllm)"
    elif choice == "auto":
        if model_path.is_dir():
            gen, source = read_generation_config(model_path), f"{model_path / 'generation_config.json'}"
        else:
            gen, source = (
                dict(builtin or {}),
                "the built-in model's card" if builtin else "none (a GGUF file)",
            )
    else:  # a directory (Settings checked that it holds a generation_config.json)
        directory = Path(choice).expanduser()
        gen, source = read_generation_config(directory), str(directory / "generation_config.json")
    if override:
        source += " + --override-generation-config"
    return {GENERATION_KEYS[k]: v for k, v in {**gen, **override}.items()}, source
