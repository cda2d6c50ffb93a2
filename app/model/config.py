"""ModelConfig: the architecture's shape, read from config.json or GGUF metadata, frozen after."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.model.errors import ModelLoadError

# Names as config.json spells them; app/layers/activation.py maps each to its function.
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # registry key: "llama", "mistral", "qwen2", "gpt2"
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
    rope_scaling: dict[str, Any] | None = None  # always carries "rope_type" when set
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (Llama's meaning)
    mlp_bias: bool = False
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    hidden_act: str = "silu"
    layer_norm_eps: float = 1e-5  # LayerNorm families (GPT-2)
    # Tokens a query may attend back to (itself included) when some layer uses a sliding window;
    # the engine attends to the whole context, so the served context is capped to it.
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                f"{self.num_kv_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ModelLoadError(
                f"unsupported activation {self.hidden_act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def position_limit(self) -> int:
        """Positions the model computes as its reference does. YaRN is static and made for
        original x factor positions, which configs often leave out of max_position_embeddings
        (Qwen2.5's recipe adds rope_scaling alone), so its reach counts too."""
        limit = self.max_position_embeddings
        if self.rope_type == "yarn":
            s = self.rope_scaling or {}
            orig, factor = s.get("original_max_position_embeddings"), s.get("factor")
            if orig and factor:
                limit = max(limit, int(orig * factor))
        return limit

    def context_limit(self) -> tuple[int, str]:
        """The longest context served, and what sets it (for messages)."""
        limit, why = self.position_limit, f"the model's context of {self.position_limit}"
        if self.rope_type == "dynamic":
            why += (
                " (rope_scaling type 'dynamic' cannot extend it here: dynamic NTK recomputes the "
                "frequencies from each forward's length, which a paged KV cache cannot reproduce)"
            )
        if self.sliding_window is not None and self.sliding_window < limit:
            limit = self.sliding_window
            why = (
                f"the model's sliding window of {limit} tokens (the engine attends to the whole "
                "context, so the context is capped to the window)"
            )
        return limit, why


# Hugging Face `architectures` -> our registry key.
_HF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
# GGUF `general.architecture` -> registry key (llama.cpp converts Mistral as `llama`).
_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}


def _unsupported(where: Path, what: str) -> ModelLoadError:
    from app.model.registry import supported_architectures

    return ModelLoadError(f"{where}: unsupported {what}; supported: {', '.join(supported_architectures())}")


def _rope_scaling(raw: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any] | None:
    """transformers' standardisation: one `rope_type` key, and the pretraining length filled
    in for the types that need it (config-level original_max_position_embeddings first)."""
    scaling = dict(raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else {}))
    if not scaling:
        return None
    scaling.pop("rope_theta", None)
    kind = scaling.pop("type", None)
    scaling["rope_type"] = scaling.get("rope_type") or kind or "default"
    if scaling["rope_type"] == "default":
        return None
    if scaling["rope_type"] in ("llama3", "yarn", "longrope"):
        orig = raw.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = int(orig or raw.get("max_position_embeddings", 2048))
    return scaling


def _window(raw: dict[str, Any], arch: str, layers: int) -> int | None:
    """The sliding window if any layer uses one, as transformers decides it per family."""
    window = raw.get("sliding_window")
    if not window:
        return None
    if arch == "qwen2":
        if not raw.get("use_sliding_window", False):
            return None
        types = raw.get("layer_types") or [
            "sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention"
            for i in range(layers)
        ]
        return int(window) if "sliding_attention" in types else None
    return int(window) if arch == "mistral" else None


def _gpt2_fields(raw: dict[str, Any]) -> dict[str, Any]:
    if not raw.get("scale_attn_weights", True) or raw.get("scale_attn_by_inverse_layer_idx", False):
        raise ModelLoadError(
            "GPT-2 variants with scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true "
            "are not supported"
        )
    hidden, heads = int(raw["n_embd"]), int(raw["n_head"])
    return dict(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        num_layers=int(raw["n_layer"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(raw["n_positions"]),
        layer_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        hidden_act=str(raw.get("activation_function", "gelu_new")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        attention_bias=True,
        mlp_bias=True,
    )


def _llama_fields(raw: dict[str, Any], arch: str) -> dict[str, Any]:
    # transformers >= 5 nests rope settings in `rope_parameters`; older configs keep them on top.
    rope = dict(raw.get("rope_parameters") or {})
    heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
    layers = int(raw["num_hidden_layers"])
    return dict(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta") or raw.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(raw, rope),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qkv_bias=arch == "qwen2",  # Qwen2's q/k/v projections always carry biases, o_proj never
        hidden_act=str(raw.get("hidden_act", "silu")),
        sliding_window=_window(raw, arch, layers),
    )


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
        raise _unsupported(cfg_file, f"architecture {archs or raw.get('model_type')!r}")
    try:
        fields = _gpt2_fields(raw) if arch == "gpt2" else _llama_fields(raw, arch)
        return ModelConfig(architecture=arch, **fields)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ModelLoadError):
            raise ModelLoadError(f"{cfg_file}: {e}") from None
        raise ModelLoadError(f"{cfg_file}: missing or invalid field {e}") from None


def config_from_gguf(
    fields: dict[str, Any], tensor_names: set[str], path: Path, rope_freqs: list[float] | None = None
) -> ModelConfig:
    """`fields` are the GGUF key/value metadata already decoded to Python values; `rope_freqs`
    the values of the file's rope_freqs tensor (Llama 3 scaling), if it has one."""
    arch_name = fields.get("general.architecture")
    arch = _GGUF_ARCH.get(arch_name or "")
    if arch is None:
        raise _unsupported(path, f"GGUF architecture {arch_name!r}")

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
    common = dict(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    if arch == "gpt2":
        return ModelConfig(
            **common,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            layer_norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
            hidden_act="gelu_new",  # llama.cpp's GPT-2 graph uses the tanh approximation
            attention_bias=True,
            mlp_bias=True,
        )
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
    if rope_freqs is not None:
        if rope_scaling is not None:
            raise ModelLoadError(f"{path}: both rope_freqs and rope.scaling.type {scaling_type!r} are set")
        rope_scaling = {"rope_type": "llama3", "freq_factors": tuple(rope_freqs)}
    window = fields.get(f"{arch_name}.attention.sliding_window")
    return ModelConfig(
        **common,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(fields.get(f"{arch_name}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        # llama.cpp names each tensor by role, so the biases a file carries say which it has
        attention_bias="blk.0.attn_output.bias" in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_down.bias" in tensor_names,
        sliding_window=int(window) if window else None,
    )
