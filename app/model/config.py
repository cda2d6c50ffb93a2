"""ModelConfig: the architecture's shape, read from config.json or GGUF metadata, frozen after."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.model.errors import ModelLoadError


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # registry key: "llama", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                f"{self.num_kv_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# Hugging Face `architectures` / `model_type` -> our registry key.
_HF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}
_GGUF_ARCH = {"llama": "llama"}


def config_from_hf(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(
            f"{cfg_file}: not found (a Hugging Face model directory needs config.json)"
        ) from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({e})") from None
    archs = raw.get("architectures") or []
    arch = next((_HF_ARCH[a] for a in archs if a in _HF_ARCH), None)
    if arch is None:
        from app.model.registry import supported_architectures

        raise ModelLoadError(
            f"{cfg_file}: unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {', '.join(supported_architectures())}"
        )
    # transformers >= 5 nests rope settings in `rope_parameters`; older configs keep them on top.
    rope = dict(raw.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        return ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{cfg_file}: missing or invalid field {e}") from None


def config_from_gguf(fields: dict[str, Any], tensor_names: set[str], path: Path) -> ModelConfig:
    """`fields` are the GGUF key/value metadata already decoded to Python values."""
    arch_name = fields.get("general.architecture")
    arch = _GGUF_ARCH.get(arch_name or "")
    if arch is None:
        from app.model.registry import supported_architectures

        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch_name!r}; supported: "
            f"{', '.join(supported_architectures())}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch_name}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch_name}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = fields.get(f"{arch_name}.vocab_size")
    if vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"{path}: GGUF metadata has neither a vocab size nor a token list")
        vocab = len(tokens)
    rope_scaling = None
    scaling_type = fields.get(f"{arch_name}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        rope_scaling = {
            "rope_type": scaling_type,
            "factor": float(fields.get(f"{arch_name}.rope.scaling.factor", 1.0)),
        }
        orig = fields.get(f"{arch_name}.rope.scaling.original_context_length")
        if orig:
            rope_scaling["original_max_position_embeddings"] = int(orig)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(fields.get(f"{arch_name}.attention.key_length") or hidden // heads),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
    )
