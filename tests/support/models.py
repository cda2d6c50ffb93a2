"""Tiny random Llama models that tests write for themselves: a Hugging Face directory, and the
same weights as a GGUF file written the way llama.cpp's convert_hf_to_gguf.py writes llama.

transformers is the reference throughout (test-only dependency): the HF directory is what
`LlamaForCausalLM.save_pretrained` writes, and tests/model/test_tiny_models.py checks that
transformers loads each GGUF back to the same logits, so a loader test that disagrees with
these files is looking at a loader bug, not a fixture bug.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
BOS_ID, EOS_ID = 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mixed prose, code, digits and multi-byte characters, so that some merged tokens are partial
# UTF-8 sequences: detokenizer tests need those.
_CORPUS = """The quick brown fox jumps over the lazy dog. A server answers requests in batches; each
step runs one forward pass over every running sequence, then samples the next token for each.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Count with me: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 3.14159 2.71828 -42 +7 = 49 (x * y) / z.
def forward(self, x):\n    return self.norm(x + self.attn(x))\n\nfor i in range(10):\n    print(i)
Café, naïve, résumé, über, señor, façade. 日本語のテキスト。中文文本。Русский текст. 🙂🚀✨ 🙂🙂
<html><body class="main">{"key": "value", "list": [1, 2, 3]}</body></html> https://example.com/a?b=c
Once upon a time there was a little model that could only say a few words, but it said them well.
"""
_CORPUS = _CORPUS * 3


def _train_tokenizer(vocab: int) -> Tokenizer:
    """A byte-level BPE of exactly `vocab` tokens: GPT-2's pre-tokenizer and byte alphabet."""
    if vocab < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab {vocab} < 259: a byte-level BPE needs the 256 bytes and the special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)
    # the corpus runs out of merges before big vocabularies fill: pad with reserved specials, as
    # real vocabularies do, so token ids and embedding rows always match one to one
    missing = vocab - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab
    return tok


def write_tokenizer(out_dir: Path, vocab: int) -> None:
    """tokenizer.json + tokenizer_config.json (chat template, bos/eos) for a `vocab`-token BPE."""
    _train_tokenizer(vocab).save(str(Path(out_dir) / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "unk_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[EOS_ID],
        "add_bos_token": False,
        "add_prefix_space": False,
        "model_max_length": 1 << 30,
        "chat_template": CHAT_TEMPLATE,
    }
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_hf_llama(
    out_dir: Path | str,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int = 128,
    vocab: int = 320,
    tie: bool = True,
    rope_theta: float = 10000.0,
    max_pos: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    rms_eps: float = 1e-5,
    init_std: float = 0.3,
    shard: bool = False,
    max_shard_size: str | int = "40KB",
) -> Path:
    """A random LlamaForCausalLM saved with save_pretrained (safetensors), plus its tokenizer.

    The default vocab is 320, not 256: a byte-level BPE needs 256 byte tokens and 3 specials.
    Weights are drawn here, not by transformers' init, so a seed gives the same model whatever
    the transformers version; init_std 0.3 keeps logits spread enough for greedy decoding to
    wander rather than repeat one token. Norm weights are drawn around 1 so a loader that drops
    them is caught.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim if head_dim is not None else hidden // heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=rms_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=tie,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else init_std * noise)
    model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=max_shard_size if shard else "50GB")
    write_tokenizer(out, vocab)
    return out


# qtype name -> the file type llama.cpp records for a file of mostly that type
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
}
GGUF_QTYPES = tuple(_FILE_TYPES)  # the types gguf-py can write (it only dequantizes K-quants)


def tensor_qtype(name: str, shape: tuple[int, ...], qtype: str, embd_qtype: str | None = None) -> QT:
    """The type write_gguf_llama stores a GGUF tensor in: norms (1-D) stay F32; a matrix whose
    rows do not split into whole blocks falls back to F16, as convert_hf_to_gguf.py does."""
    if len(shape) == 1:
        return QT.F32
    want = QT[embd_qtype or qtype] if name.startswith("token_embd") else QT[qtype]
    block, _ = gguf.GGML_QUANT_SIZES[want]
    return want if shape[-1] % block == 0 else QT.F16


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: per head, HF's [first half | second half] rotary layout
    becomes interleaved pairs (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_state_dict(source: Path | LlamaForCausalLM) -> dict[str, torch.Tensor]:
    if isinstance(source, LlamaForCausalLM):
        return {k: v.detach() for k, v in source.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(source).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def write_gguf_llama(
    path: Path | str,
    source: Path | str | LlamaForCausalLM,
    *,
    qtype: str = "F32",
    embd_qtype: str | None = None,
    tokenizer_dir: Path | str | None = None,
    pre: str = "gpt2",
) -> Path:
    """The HF llama in `source` (a write_hf_llama directory, or a model loaded from one) as GGUF.

    qtype is the type of every matrix (one of GGUF_QTYPES), embd_qtype of token_embd if it
    differs (the default model keeps token_embd in Q8_0 and the rest in Q4_1). `pre` is
    llama.cpp's pre-tokenizer name: "gpt2" is the one whose split regex is GPT-2's, which is
    what write_hf_llama's tokenizer uses.
    """
    if isinstance(source, LlamaForCausalLM):
        config: dict[str, Any] = source.config.to_dict()
        src_dir = Path(tokenizer_dir or source.name_or_path)
    else:
        src_dir = Path(source)
        config = json.loads((src_dir / "config.json").read_text())
    tok_dir = Path(tokenizer_dir or src_dir)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hidden, n_layer = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope = config.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    tie = bool(config.get("tie_word_embeddings", False))

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("tiny-llama")
    w.add_block_count(n_layer)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if head_dim != hidden // n_head:
        # convert writes these whenever config.json states head_dim, and transformers 5 always
        # states it; writing them only when they say something keeps most files like SmolLM2's
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(_FILE_TYPES[qtype])
    w.add_vocab_size(config["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    _add_tokenizer(w, tok_dir, config["vocab_size"], pre)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    for hf_name, tensor in _hf_state_dict(source).items():
        if hf_name == "lm_head.weight" and tie:
            continue  # a tied model has no output tensor: llama.cpp reuses token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        data = tensor.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = llama_permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_permute(data, n_kv)
        t = tensor_qtype(name, data.shape, qtype, embd_qtype)
        w.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, rope_theta, rope))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def llama3_rope_factors(head_dim: int, base: float, rope: dict[str, Any]) -> np.ndarray:
    """Llama 3 scaling as convert_hf_to_gguf.py stores it: a divisor per rotary frequency."""
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for wavelen in 2 * np.pi / freqs:
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int, pre: str) -> None:
    """The tokenizer as llama.cpp's gpt2-style metadata: tokens in id order, types, merges."""
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    tok_config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {a["id"] for a in spec["added_tokens"] if a["special"]}
    by_id.update({a["id"]: a["content"] for a in spec["added_tokens"]})
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [
        gguf.TokenType.CONTROL if i in special
        else gguf.TokenType.NORMAL if i in by_id
        else gguf.TokenType.UNUSED
        for i in range(vocab_size)
    ]  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids[tok_config["bos_token"]])
    w.add_eos_token_id(ids[tok_config["eos_token"]])
    w.add_unk_token_id(ids[tok_config["unk_token"]])
    w.add_pad_token_id(ids[tok_config["pad_token"]])
    w.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    w.add_add_space_prefix(bool(tok_config.get("add_prefix_space", False)))
    w.add_chat_template(tok_config["chat_template"])


def quant_roundtrip(weight: torch.Tensor, qtype: QT) -> torch.Tensor:
    """What a matrix becomes after gguf quantizes it to qtype and dequantizes it again (float32).

    Quantization blocks run along rows, and the Q/K permutation only reorders rows, so this
    equals the un-permuted dequantized GGUF tensor without repeating the permutation.
    """
    data = weight.to(torch.float32).numpy()
    return torch.from_numpy(
        np.ascontiguousarray(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype))
    )


def hf_llama_as_quantized(hf_dir: Path | str, qtype: str, embd_qtype: str | None = None) -> LlamaForCausalLM:
    """The float32 HF model whose matrices hold exactly what write_gguf_llama(qtype) stores:
    the reference for anything loading a quantized tiny GGUF."""
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    with torch.no_grad():
        for hf_name, p in model.named_parameters():
            if p.ndim == 2:
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                p.copy_(quant_roundtrip(p, tensor_qtype(name, tuple(p.shape), qtype, embd_qtype)))
    return model


_CACHE: dict[tuple[int, str], Path] = {}


def tiny_llama(tmp_path_factory: Any, **kw: Any) -> Path:
    """write_hf_llama, once per distinct kwargs per test session (pass pytest's tmp_path_factory)."""
    key = (id(tmp_path_factory), "hf" + repr(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = write_hf_llama(tmp_path_factory.mktemp("tiny_llama"), **kw)
    return _CACHE[key]


def tiny_gguf(tmp_path_factory: Any, qtype: str = "F32", embd_qtype: str | None = None, **kw: Any) -> Path:
    """write_gguf_llama of tiny_llama(**kw), memoised the same way."""
    key = (id(tmp_path_factory), f"gguf{qtype}{embd_qtype}" + repr(sorted(kw.items())))
    if key not in _CACHE:
        hf_dir = tiny_llama(tmp_path_factory, **kw)
        out = tmp_path_factory.mktemp("tiny_gguf") / f"tiny-{qtype}.gguf"
        _CACHE[key] = write_gguf_llama(out, hf_dir, qtype=qtype, embd_qtype=embd_qtype)
    return _CACHE[key]
