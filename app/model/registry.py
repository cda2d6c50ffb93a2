"""Architecture name -> model class. Families register here and nowhere else."""

from __future__ import annotations

from torch import nn

from app.model.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None
