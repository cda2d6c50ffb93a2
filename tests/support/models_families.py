"""Tiny random GPT-2, Qwen2, Mistral and rope-scaled Llama models written with transformers, and
GGUF copies written the way llama.cpp's convert_hf_to_gguf.py writes each architecture.

As in tests/support/models.py, weights are drawn here from a seed, not by transformers' init; norms are
drawn around 1 and every bias is drawn too, so a loader that drops one is caught."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file

from tests.support.models import _FILE_TYPES, BOS_ID, EOS_ID, _add_tokenizer, quant_roundtrip, write_tokenizer

FAMILY_CLASSES = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
}


def _config(family: str, kw: dict[str, Any]) -> transformers.PretrainedConfig:
    hidden, heads, layers = kw["hidden"], kw["heads"], kw.get("layers", 2)
    vocab, max_pos = kw.get("vocab", 320), kw.get("max_pos", 128)
    ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_pos,
            n_inner=kw.get("intermediate"), tie_word_embeddings=kw.get("tie", True), **ids,
        )  # fmt: skip
    extra: dict[str, Any] = {}
    if family == "mistral":
        extra["sliding_window"] = kw.get("sliding_window")
    if family == "qwen2" and kw.get("sliding_window"):
        extra.update(use_sliding_window=True, sliding_window=kw["sliding_window"], max_window_layers=1)
    rope = {"rope_type": "default", "rope_theta": kw.get("rope_theta", 10000.0), **kw.get("rope", {})}
    return FAMILY_CLASSES[family][0](
        vocab_size=vocab, hidden_size=hidden, intermediate_size=kw.get("intermediate", 96),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kw.get("kv_heads", heads),
        head_dim=hidden // heads, max_position_embeddings=max_pos, rms_norm_eps=1e-5,
        tie_word_embeddings=kw.get("tie", False), rope_parameters=rope, **ids, **extra,
    )  # fmt: skip


def write_hf_family(
    out_dir: Path | str, family: str, *, init_std: float = 0.1, seed: int = 0, **kw: Any
) -> Path:
    """A random `family` model saved with save_pretrained, plus tokenizer files.

    kw: hidden, heads, kv_heads, layers, intermediate, vocab, max_pos, tie, rope_theta,
    rope (extra rope_parameters, e.g. a scaling type), sliding_window (mistral, qwen2)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = FAMILY_CLASSES[family][1](_config(family, kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            is_norm = name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_(1.0 + 0.1 * noise if is_norm else init_std * noise)
    model.save_pretrained(out)
    write_tokenizer(out, model.config.vocab_size)
    return out


def load_hf(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _state(src: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    return state


# GPT-2's Conv1D weights, which convert_hf_to_gguf.py transposes to llama.cpp's [out, in]
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def gguf_qtype(name: str, shape: tuple[int, ...], qtype: str) -> QT:
    """As the converter: 1-D tensors, biases and position_embd stay F32; a matrix whose rows do
    not split into whole blocks falls back to F16."""
    if len(shape) == 1 or not name.endswith(".weight") or name.startswith("position_embd"):
        return QT.F32
    want = QT[qtype]
    return want if shape[-1] % gguf.GGML_QUANT_SIZES[want][0] == 0 else QT.F16


def write_gguf_family(
    path: Path | str, src: Path | str, *, qtype: str = "F32", output_copy: bool = False
) -> Path:
    """The gpt2 or qwen2 HF model in `src` as GGUF. Mistral converts as `llama`: use
    tests.support.models.write_gguf_llama for it. `output_copy` writes GPT-2's tied head as its own
    `output` tensor, as llama.cpp's converter did before 2025."""
    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    family = config["model_type"]
    arch = {"gpt2": gguf.MODEL_ARCH.GPT2, "qwen2": gguf.MODEL_ARCH.QWEN2}[family]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"tiny-{family}")
    if family == "gpt2":
        n_layer, hidden = config["n_layer"], config["n_embd"]
        w.add_block_count(n_layer)
        w.add_context_length(config["n_positions"])
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(config.get("n_inner") or 4 * hidden)
        w.add_head_count(config["n_head"])
        w.add_layer_norm_eps(config["layer_norm_epsilon"])
    else:
        n_layer = config["num_hidden_layers"]
        w.add_block_count(n_layer)
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(config["hidden_size"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(config["num_attention_heads"])
        w.add_head_count_kv(config["num_key_value_heads"])
        w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
        w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_file_type(_FILE_TYPES[qtype])
    _add_tokenizer(w, src, config["vocab_size"], "gpt2")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    names = gguf.get_tensor_name_map(arch, n_layer)
    tie = bool(config.get("tie_word_embeddings", family == "gpt2"))
    for hf_name, tensor in _state(src).items():
        if hf_name == "lm_head.weight" and tie:
            continue
        data = tensor.to(torch.float32)
        if family == "gpt2" and hf_name.endswith(_CONV1D):
            data = data.t().contiguous()
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        out = [name] + (["output.weight"] if output_copy and name == "token_embd.weight" else [])
        for n in out:
            t = gguf_qtype(n, tuple(data.shape), qtype)
            w.add_tensor(n, gguf.quants.quantize(data.numpy(), t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def hf_as_stored(src: Path, qtype: str) -> transformers.PreTrainedModel:
    """The float32 HF model holding exactly what write_gguf_family(qtype) stores: quantization
    blocks run along llama.cpp's rows, so Conv1D weights round-trip transposed."""
    model = load_hf(src)
    gpt2 = model.config.model_type == "gpt2"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2:
                continue
            conv1d = gpt2 and name.endswith(_CONV1D)
            stored = p.t() if conv1d else p
            gname = "position_embd.weight" if name.endswith("wpe.weight") else "x.weight"
            back = quant_roundtrip(stored, gguf_qtype(gname, tuple(stored.shape), qtype))
            p.copy_(back.t() if conv1d else back)
    return model
