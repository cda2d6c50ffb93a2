"""GPT-2, Qwen2 and Mistral, and every RoPE scaling type, against transformers' implementations.

Each family is a tiny random model written by transformers (tests/support/models_families.py); GGUF
copies are written as llama.cpp's converter writes that architecture. Head counts are chosen so
that TP=2 splits them unevenly (GPT-2 3 heads, Qwen2 6 q / 3 kv) or replicates KV (Mistral 1)."""

from __future__ import annotations

import json
import logging
import queue
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from app.cli import main
from app.engine.types import GenerateRequest, SamplingParams
from app.layers.rotary import RotaryEmbedding
from app.model.costs import model_costs
from app.model.errors import ModelLoadError
from app.model.loader import read_config
from app.model.registry import supported_architectures
from app.settings import Settings
from app.stack import _max_model_len, build_stack
from tests.support.forward import greedy, hf_logits, load_ours, load_rank, logits, pool_greedy, small_pool
from tests.support.models import write_gguf_llama
from tests.support.models_families import hf_as_stored, load_hf, write_gguf_family, write_hf_family

FAMILIES = {
    "gpt2": dict(hidden=96, heads=3),  # 3 heads: 2 + 1 at TP=2
    "qwen2": dict(hidden=96, heads=6, kv_heads=3, tie=True),  # 3 KV heads: 2 + 1
    "mistral": dict(hidden=64, heads=4, kv_heads=1),  # one KV head, replicated at TP=2
}
PROMPT = list(range(5, 21))
STEPS = 10


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    return {f: write_hf_family(tmp_path_factory.mktemp(f), f, **kw) for f, kw in FAMILIES.items()}


@pytest.fixture(scope="module")
def refs(hf_dirs) -> dict[str, transformers.PreTrainedModel]:
    return {f: load_hf(p) for f, p in hf_dirs.items()}


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(ref, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    # an explicit mask: otherwise generate() masks out every prompt token equal to the pad id,
    # and the chat template's <|im_end|> is the pad token of these tokenizers
    out = ref.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_logits_and_greedy(hf_dirs, refs, family):
    ours = load_ours(hf_dirs[family])
    assert ours.config.architecture == family
    ids = _ids(40)
    assert (logits(ours, ids) - hf_logits(refs[family], ids)).abs().max() <= 1e-4
    assert greedy(ours, PROMPT, STEPS) == _hf_greedy(refs[family], PROMPT, STEPS)


@pytest.mark.parametrize(
    "family,qtype,output_copy",
    [("gpt2", "F32", False), ("gpt2", "Q8_0", True), ("qwen2", "F32", False), ("qwen2", "Q8_0", False),
     ("mistral", "F32", False)],
)  # fmt: skip
def test_gguf_logits_and_greedy(hf_dirs, refs, tmp_path, family, qtype, output_copy):
    src = hf_dirs[family]
    if family == "mistral":  # llama.cpp converts Mistral as `llama`, Q/K rows permuted
        path = write_gguf_llama(tmp_path / "m.gguf", src, qtype=qtype)
    else:
        path = write_gguf_family(tmp_path / "m.gguf", src, qtype=qtype, output_copy=output_copy)
    ref = refs[family] if qtype == "F32" else hf_as_stored(src, qtype)  # exactly what the file holds
    ours = load_ours(path)
    assert ours.config.architecture == ("llama" if family == "mistral" else family)
    ids = _ids(33, seed=2)
    assert (logits(ours, ids) - hf_logits(ref, ids)).abs().max() <= 1e-4
    assert greedy(ours, PROMPT, STEPS) == _hf_greedy(ref, PROMPT, STEPS)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_equals_transformers(hf_dirs, refs, family):
    """Biases split with their columns, row-parallel biases once after the all-reduce: greedy
    tokens and top-5 logprobs of the TP=2 ranks equal transformers' incremental decode."""
    with torch.no_grad():
        out = refs[family].generate(
            torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    ref_tokens = out.sequences[0, len(PROMPT) :].tolist()
    ref_logp = torch.log_softmax(torch.cat(out.logits), dim=-1)
    pool = small_pool(hf_dirs[family], 2)
    pool.start()
    try:
        tokens, tops = pool_greedy(pool, PROMPT, STEPS)
    finally:
        pool.shutdown()
    assert tokens == ref_tokens
    for step, top in enumerate(tops):
        for i, lp in top:
            assert abs(lp - ref_logp[step, i].item()) <= 1e-4


# Relative L2 error of the logits against transformers' fp32 (measured: int8 2.0-3.4%, bf16 0.5-0.8%).
@pytest.mark.parametrize("dtype,max_rel_l2", [("int8", 0.05), ("bf16", 0.02)])
@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_precision_error_is_bounded(hf_dirs, refs, family, dtype, max_rel_l2):
    ids = _ids(40)
    ref = hf_logits(refs[family], ids)
    got = logits(load_ours(hf_dirs[family], dtype), ids)
    assert ((got - ref).norm() / ref.norm()).item() <= max_rel_l2


def test_gpt2_int8_tp2(hf_dirs, refs):
    """int8 weights with fp32 biases at TP=2: each rank holds about half, and the first step's
    logprobs stay within the int8 error of transformers' fp32 ones."""
    whole = load_ours(hf_dirs["gpt2"], "int8").weight_bytes
    halves = [load_rank(hf_dirs["gpt2"], "int8", 2, r).weight_bytes for r in range(2)]
    assert all(0.3 * whole < h < 0.75 * whole for h in halves)
    pool = small_pool(hf_dirs["gpt2"], 2, "int8")
    pool.start()
    try:
        tokens, tops = pool_greedy(pool, PROMPT, 1, logprobs=20)
    finally:
        pool.shutdown()
    ref_logp = torch.log_softmax(hf_logits(refs["gpt2"], torch.tensor(PROMPT))[-1], dim=-1)
    assert tokens[0] == int(ref_logp.argmax())
    assert max(abs(lp - ref_logp[i].item()) for i, lp in tops[0]) <= 0.1


def test_qwen2_gguf_served_end_to_end(hf_dirs, refs, tmp_path):
    """`--model X.gguf` picks the family from the file: the engine's greedy chat continuation
    (tokenizer and chat template from the GGUF) equals transformers'."""
    path = write_gguf_family(tmp_path / "q.gguf", hf_dirs["qwen2"])
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    stack = build_stack(Settings(model=str(path), dtype="fp32", kv_cache_tokens=512), on_outputs=outputs.put)
    assert stack.config.architecture == "qwen2"
    tok = stack.tokenizer
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "Hello!"}]), add_special_tokens=False
    )
    stack.start()
    got: list[int] = []
    try:
        params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
        stack.engine.add_request(GenerateRequest("r", tuple(prompt), params, time.monotonic()))
        done = False
        while not done:
            for out in outputs.get(timeout=60):
                got.extend(out.token_ids)
                done = done or out.finish_reason is not None
    finally:
        stack.shutdown()
    assert got == _hf_greedy(refs["qwen2"], prompt, STEPS)


def test_gpt2_files_without_the_transformer_prefix(hf_dirs, refs, tmp_path):
    """The hub's gpt2 was saved from GPT2Model: no `transformer.` prefix, and causal-mask buffers."""
    src = hf_dirs["gpt2"]
    state = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    ids = _ids(20)
    assert (logits(load_ours(tmp_path), ids) - hf_logits(refs["gpt2"], ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_costs_predict_the_arenas_of_new_families(hf_dirs, tmp_path, family):
    paths = [hf_dirs[family], write_gguf_family(tmp_path / "m.gguf", hf_dirs[family], qtype="Q8_0")]
    for path in paths:
        costs = model_costs(path, ["fp32", "int8"], [1, 2])
        for split in costs.splits:
            for rank in split.ranks:
                for dtype in ("fp32", "int8"):
                    real = load_rank(path, dtype, split.tp, rank.rank).weight_bytes
                    assert rank.weights[dtype].total == real
    ref = load_hf(hf_dirs[family])
    assert model_costs(hf_dirs[family], ["fp32"], [1]).total_params == ref.num_parameters()


# --- RoPE scaling -------------------------------------------------------------------------------

ROPE = {
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=16),
    "yarn-mscale": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=16, beta_fast=16,
                        beta_slow=2, mscale=0.8, mscale_all_dim=0.5),
    "llama3": dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=16, low_freq_factor=1.0,
                   high_freq_factor=4.0),
}  # fmt: skip
ROPE_MODEL = dict(hidden=64, heads=2, kv_heads=1, layers=1, max_pos=128, rope_theta=500.0)


@pytest.mark.parametrize("kind", ROPE)
def test_rope_tables_equal_transformers(tmp_path, kind):
    """cos/sin (YaRN's attention factor included) at every position the model serves."""
    path = write_hf_family(tmp_path, "llama", rope=ROPE[kind], **ROPE_MODEL)
    cfg = read_config(path)
    hf = LlamaRotaryEmbedding(transformers.AutoConfig.from_pretrained(path))
    n = cfg.context_limit()[0]
    cos, sin = hf(torch.zeros(1), torch.arange(n)[None])
    ours = RotaryEmbedding(cfg.head_dim, cfg.position_limit, cfg.rope_theta, cfg.rope_scaling)
    assert (ours.tables()[0][:n] - cos[0]).abs().max() <= 1e-6
    assert (ours.tables()[1][:n] - sin[0]).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ROPE)
def test_rope_scaled_model_equals_transformers_past_the_original_context(tmp_path, kind):
    """100 positions: past the original 16 of yarn/llama3 (dynamic: up to its limit, which is
    where transformers' dynamic NTK still uses the unscaled base)."""
    path = write_hf_family(tmp_path, "llama", rope=ROPE[kind], **ROPE_MODEL)
    ids = _ids(100)
    got = logits(load_ours(path), ids)
    assert (got - hf_logits(load_hf(path), ids)).abs().max() <= 1e-4


def test_llama3_gguf_rope_freqs_equal_transformers(tmp_path):
    """llama.cpp stores Llama 3 scaling as a rope_freqs tensor, not as metadata."""
    src = write_hf_family(tmp_path / "hf", "llama", rope=ROPE["llama3"], **ROPE_MODEL)
    path = write_gguf_llama(tmp_path / "m.gguf", src)
    assert read_config(path).rope_scaling["rope_type"] == "llama3"
    ids = _ids(100)
    assert (logits(load_ours(path), ids) - hf_logits(load_hf(src), ids)).abs().max() <= 1e-4


def test_yarn_serves_original_times_factor(tmp_path):
    """Qwen2.5's recipe adds YaRN to a config whose max_position_embeddings stays the original
    length: the model is served to original x factor, and matches transformers there."""
    rope = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
    path = write_hf_family(tmp_path, "qwen2", rope=rope, **{**ROPE_MODEL, "max_pos": 32})
    assert read_config(path).context_limit()[0] == 128
    ids = _ids(120)
    assert (logits(load_ours(path), ids) - hf_logits(load_hf(path), ids)).abs().max() <= 1e-4


def test_dynamic_ntk_refuses_a_longer_context(tmp_path):
    path = write_hf_family(tmp_path, "llama", rope=ROPE["dynamic"], **ROPE_MODEL)
    cfg = read_config(path)
    assert _max_model_len(Settings(model=str(path)), cfg) == 128
    with pytest.raises(ValueError, match=r"256 exceeds .*128.*'dynamic'") as e:
        _max_model_len(Settings(model=str(path), max_model_len=256), cfg)
    assert "\n" not in str(e.value)


def test_unsupported_rope_type_is_a_one_line_load_error(tmp_path):
    path = write_hf_family(tmp_path, "llama", **ROPE_MODEL)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 500.0, "short_factor": [1.0] * 16,
                              "long_factor": [2.0] * 16}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError, match=r"unsupported rope_scaling type 'longrope'; supported: .*yarn"
    ) as e:
        load_ours(path)
    assert "\n" not in str(e.value)


# --- sliding window, family errors, --help -----------------------------------------------------


def test_mistral_sliding_window_caps_the_context(tmp_path, caplog):
    path = write_hf_family(tmp_path, "mistral", sliding_window=24, **FAMILIES["mistral"])
    cfg = read_config(path)
    assert cfg.sliding_window == 24
    with caplog.at_level(logging.INFO, "shardserve"):
        assert _max_model_len(Settings(model=str(path)), cfg) == 24
    assert "sliding window of 24" in caplog.text
    with pytest.raises(ValueError, match=r"--max-model-len 64 exceeds the model's sliding window of 24"):
        _max_model_len(Settings(model=str(path), max_model_len=64), cfg)
    ids = _ids(24)  # the whole window: transformers' sliding mask hides nothing yet
    assert (logits(load_ours(path), ids) - hf_logits(load_hf(path), ids)).abs().max() <= 1e-4


def test_qwen2_window_only_when_enabled(tmp_path, hf_dirs):
    assert read_config(hf_dirs["qwen2"]).sliding_window is None  # use_sliding_window false
    path = write_hf_family(tmp_path, "qwen2", sliding_window=32, **FAMILIES["qwen2"])
    assert read_config(path).context_limit()[0] == 32


def test_unsupported_family_is_a_one_line_error_naming_the_supported(hf_dirs, tmp_path):
    for f in hf_dirs["mistral"].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["PhiForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_ours(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "PhiForCausalLM" in msg
    assert msg.endswith("supported: " + ", ".join(supported_architectures()))
    assert set(supported_architectures()) == {"llama", "mistral", "qwen2", "gpt2"}


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ModelLoadError, match=r"unsupported GGUF architecture 'phi2'; supported: llama, mistral"
    ):
        load_ours(tmp_path / "phi.gguf")


def test_serve_help_lists_the_families(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for family in supported_architectures():
        assert family in text
    assert "Qwen2" in text and "GPT-2" in text
