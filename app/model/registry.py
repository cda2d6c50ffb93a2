"""Architecture name -> model class. Families register here and nowhere else.

Classes are named by module and attribute and imported on first use, so this module imports no
torch: settings.py lists the families in `--help` from here without paying for torch at start."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Family:
    module: str
    cls: str
    examples: str  # what users know the family by, for --help


ARCHITECTURES: dict[str, Family] = {
    "llama": Family("app.model.llama", "LlamaForCausalLM", "Llama 2/3, SmolLM"),
    "mistral": Family("app.model.llama", "LlamaForCausalLM", "Mistral"),
    "qwen2": Family("app.model.llama", "LlamaForCausalLM", "Qwen2, Qwen2.5"),
    "gpt2": Family("app.model.gpt2", "GPT2LMHeadModel", "GPT-2"),
}


def supported_architectures() -> list[str]:
    return list(ARCHITECTURES)  # registration order: the default model's family first


def describe_families() -> str:
    """One line for --help: 'llama (Llama 2/3, SmolLM), mistral (Mistral), ...'."""
    return ", ".join(f"{k} ({f.examples})" for k, f in ARCHITECTURES.items())


def model_class(architecture: str) -> type[nn.Module]:
    try:
        family = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None
    return getattr(importlib.import_module(family.module), family.cls)
