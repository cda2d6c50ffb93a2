"""The tiny-model writers in tests/support/models.py are right, judged by transformers alone.

transformers reads the GGUF files (undoing llama.cpp's Q/K permutation and dequantizing with
gguf-py) and must give the logits of the HF model they came from, so the other tests can trust
these files as references for our loader.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tests.support.models import (
    BOS_ID,
    EOS_ID,
    SPECIAL_TOKENS,
    hf_llama_as_quantized,
    tiny_gguf,
    tiny_llama,
    write_gguf_llama,
)

SHAPES = {
    "4q2kv-tied": {},
    "4q2kv-untied": {"tie": False},
    "9q3kv-tied": {"hidden": 288, "heads": 9, "kv_heads": 3},  # SmolLM2's head ratio
    "9q3kv-untied-hd64": {"hidden": 288, "heads": 9, "kv_heads": 3, "head_dim": 64, "tie": False},
}
PROMPT = torch.tensor([[BOS_ID, 40, 77, 100, 260, 300, 12, 9, 150, 151, 3]])
TEXTS = [
    "Hello, world!",
    "  two  spaces\tand\ttabs\n\nlines",
    "Café 日本語 🙂🚀 x=3.14159",
    "<|im_start|>user",
]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits[0]


def _hf(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _from_gguf(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_f32_gguf_equals_hf(tmp_path_factory, shape):
    hf_dir = tiny_llama(tmp_path_factory, **SHAPES[shape])
    ref, got = _logits(_hf(hf_dir)), _logits(_from_gguf(tiny_gguf(tmp_path_factory, "F32", **SHAPES[shape])))
    assert ref.std() > 0.5  # not a flat model
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "qtype", "embd_qtype"),
    [
        ("4q2kv-tied", "F16", None),
        ("4q2kv-untied", "BF16", None),
        ("4q2kv-untied", "Q8_0", None),
        ("9q3kv-tied", "Q4_1", "Q8_0"),  # the default model's mix
        ("9q3kv-untied-hd64", "Q4_0", None),
        ("4q2kv-tied", "Q5_0", None),
        ("9q3kv-untied-hd64", "Q5_1", "Q8_0"),
    ],
)
def test_quantized_gguf_equals_dequantized_hf(tmp_path_factory, shape, qtype, embd_qtype):
    hf_dir = tiny_llama(tmp_path_factory, **SHAPES[shape])
    path = tiny_gguf(tmp_path_factory, qtype, embd_qtype, **SHAPES[shape])
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.ffn_down.weight"] == qtype
    assert types["token_embd.weight"] == (embd_qtype or qtype) and types["output_norm.weight"] == "F32"

    got = _logits(_from_gguf(path))
    torch.testing.assert_close(
        got, _logits(hf_llama_as_quantized(hf_dir, qtype, embd_qtype)), rtol=0, atol=1e-5
    )
    # and quantization moved the logits only as far as its precision allows (relative RMS error;
    # a random net amplifies 4-bit error to ~0.7, and unrelated logits would give ~1.4)
    ref = _logits(_hf(hf_dir))
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < {"F16": 1e-2, "BF16": 5e-2, "Q8_0": 5e-2}.get(qtype, 0.9), rel


def test_gguf_metadata_and_layout(tmp_path_factory):
    kw = SHAPES["9q3kv-untied-hd64"]
    reader = gguf.GGUFReader(tiny_gguf(tmp_path_factory, "F32", **kw))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    expect = {
        "llama.block_count": 2, "llama.embedding_length": 288, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3, "llama.context_length": 256,
        "llama.rope.dimension_count": 64, "llama.attention.key_length": 64, "llama.vocab_size": 320,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
    }  # fmt: skip
    assert {k: meta[k] for k in expect} == expect
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.tokens"][:3] == list(SPECIAL_TOKENS)
    assert meta["tokenizer.ggml.token_type"][:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL]

    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and len(tensors) == 2 * 9 + 3
    # GGUF lists dimensions fastest-first: a (rows, cols) torch weight is stored as [cols, rows]
    assert list(tensors["blk.0.attn_q.weight"].shape) == [288, 9 * 64]
    assert list(tensors["blk.1.attn_k.weight"].shape) == [288, 3 * 64]
    assert list(tensors["blk.0.attn_output.weight"].shape) == [9 * 64, 288]

    # the Q rows are the HF rows in llama.cpp's order: per head, pairs (i, i + d/2) interleaved
    hf = _hf(tiny_llama(tmp_path_factory, **kw)).model.layers[0].self_attn.q_proj.weight.detach().numpy()
    q = np.asarray(tensors["blk.0.attn_q.weight"].data)
    head0 = hf[:64]
    assert (
        np.array_equal(q[0], head0[0]) and np.array_equal(q[1], head0[32]) and np.array_equal(q[2], head0[1])
    )


def test_tied_gguf_has_no_output_tensor(tmp_path_factory):
    names = {t.name for t in gguf.GGUFReader(tiny_gguf(tmp_path_factory, "F32")).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


def test_gguf_tokenizer_matches_hf_tokenizer(tmp_path_factory):
    hf_dir = tiny_llama(tmp_path_factory)
    path = tiny_gguf(tmp_path_factory, "F32")
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=str(path))
    assert isinstance(hf_tok, PreTrainedTokenizerFast) and len(hf_tok) == 320
    for text in TEXTS:
        ids = hf_tok(text, add_special_tokens=False).input_ids
        assert gguf_tok(text, add_special_tokens=False).input_ids == ids
        assert hf_tok.decode(ids) == text
    assert hf_tok("<|im_end|>", add_special_tokens=False).input_ids == [EOS_ID]
    chat = [{"role": "user", "content": "Hi"}]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    assert gguf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected


def test_tokenizer_has_partial_utf8_tokens(tmp_path_factory):
    """Detokenizer tests rely on single tokens that are not whole characters."""
    tok = AutoTokenizer.from_pretrained(tiny_llama(tmp_path_factory))
    ids = tok("🙂🚀 日本語", add_special_tokens=False).input_ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_sharded_and_bf16_checkpoints(tmp_path_factory):
    ref = _logits(_hf(tiny_llama(tmp_path_factory)))
    sharded = tiny_llama(tmp_path_factory, shard=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(_logits(_hf(sharded)), ref, rtol=0, atol=0)
    # a GGUF written from shards is the same model
    torch.testing.assert_close(_logits(_from_gguf(tiny_gguf(tmp_path_factory, "F32", shard=True))), ref)

    bf16 = tiny_llama(tmp_path_factory, dtype=torch.bfloat16)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    got = _logits(_hf(bf16))
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_greedy_continuation_is_not_degenerate(tmp_path_factory):
    model = _hf(tiny_llama(tmp_path_factory))
    out = model.generate(PROMPT, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, PROMPT.shape[1] :]
    assert len(set(out.tolist())) >= 10


def test_write_gguf_from_loaded_model(tmp_path_factory, tmp_path):
    hf_dir = tiny_llama(tmp_path_factory, tie=False)
    model = _hf(hf_dir)
    path = write_gguf_llama(tmp_path / "m.gguf", model, qtype="F32")
    torch.testing.assert_close(_logits(_from_gguf(path)), _logits(model), rtol=0, atol=1e-5)
