"""`shardserve inspect` and app/model/costs.py against what the ranks really allocate.

References: the arenas `load_model` allocates and the KV cache `ModelRunner` allocates (the real
code paths, not the cost model), transformers' own parameter counts, gguf-py's reader for the
default model's tensor sizes, and the kernel's per-process read counter for "no weight data"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoConfig, LlamaForCausalLM

from app.cli import main
from app.cli.inspect_model import fit
from app.model.costs import PARTS, model_costs, weight_bytes_per_rank
from app.model.gguf_file import read_gguf
from app.model.loader import read_config
from app.model.memory import kv_bytes_per_token
from app.worker.runner import ModelRunner
from tests.support.forward import load_rank
from tests.support.models import tiny_gguf, tiny_llama

DTYPES = ["fp32", "bf16", "int8"]
GQA_9_3 = dict(hidden=288, heads=9, kv_heads=3, intermediate=96, tie=False)  # uneven splits at tp=2


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return {
        "hf-9-3-untied": tiny_llama(tmp_path_factory, **GQA_9_3),
        "gguf-4-2-tied": tiny_gguf(tmp_path_factory, qtype="Q8_0"),  # tp=3 replicates KV heads
    }


@pytest.mark.parametrize("name", ["hf-9-3-untied", "gguf-4-2-tied"])
def test_predicted_weight_bytes_equal_the_allocated_arenas(models, name):
    path = models[name]
    config = read_config(path)
    costs = model_costs(path, DTYPES, [1, 2, 3])
    for split in costs.splits:
        for dtype in DTYPES:
            real = [load_rank(path, dtype, split.tp, r).weight_bytes for r in range(split.tp)]
            assert weight_bytes_per_rank(config, dtype, split.tp) == real, (split.tp, dtype)
            assert [r.weights[dtype].total for r in split.ranks] == real, (split.tp, dtype)
            for r in split.ranks:
                share = r.weights[dtype]
                assert share.sharded + share.replicated == share.total
        if split.tp == 1:
            assert costs.weight_bytes == {d: split.ranks[0].weights[d].total for d in DTYPES}


def test_replicated_bytes_are_the_norms_and_row_parallel_scales(models):
    """Independent arithmetic: fp32 norms (2 per layer + final), and for int8 also the fp32
    per-row scales of o_proj and down_proj, whose rows are not split by row parallelism."""
    cfg = read_config(models["hf-9-3-untied"])
    costs = model_costs(models["hf-9-3-untied"], DTYPES, [2])
    align = lambda n: -(-n // 64) * 64  # noqa: E731 - the arena's per-tensor alignment
    norms = (2 * cfg.num_layers + 1) * align(cfg.hidden_size * 4)
    scales = 2 * cfg.num_layers * align(cfg.hidden_size * 4)
    for r in costs.splits[0].ranks:
        assert r.weights["fp32"].replicated == norms
        assert r.weights["bf16"].replicated == norms
        assert r.weights["int8"].replicated == norms + scales


@pytest.mark.parametrize("name", ["hf-9-3-untied", "gguf-4-2-tied"])
def test_kv_bytes_equal_what_the_runner_allocates(models, name):
    path = models[name]
    config = read_config(path)
    block_size, max_len, seqs = 4, 10, 2
    num_blocks = seqs * -(-max_len // block_size)  # every sequence at full context, whole blocks
    costs = model_costs(
        path, ["fp32"], [1, 2, 3], max_model_len=max_len, max_num_seqs=seqs, block_size=block_size
    )
    for split in costs.splits:
        for r in split.ranks:
            runner = ModelRunner(
                load_rank(path, "fp32", split.tp, r.rank),
                num_blocks=num_blocks,
                block_size=block_size,
                is_driver=False,
            )
            per_token = runner.kv_cache_bytes // (num_blocks * block_size)
            assert per_token * num_blocks * block_size == runner.kv_cache_bytes
            assert r.kv_bytes_per_token == per_token == kv_bytes_per_token(config, split.tp, r.rank)
            assert r.kv_cache_bytes == runner.kv_cache_bytes


def test_parameters_by_part_match_transformers(models):
    path = models["hf-9-3-untied"]
    ref = LlamaForCausalLM(AutoConfig.from_pretrained(path))
    expect = dict.fromkeys(PARTS, 0)
    for name, p in ref.named_parameters():
        part = (
            "embeddings" if "embed_tokens" in name
            else "lm_head" if name.startswith("lm_head")
            else "attention" if ".self_attn." in name
            else "mlp" if ".mlp." in name
            else "norms"
        )  # fmt: skip
        expect[part] += p.numel()
    costs = model_costs(path, ["fp32"], [1])
    assert costs.params == expect
    assert costs.total_params == sum(p.numel() for p in ref.parameters())


def test_sharded_safetensors_read_every_header(tmp_path_factory, models):
    sharded = tiny_llama(tmp_path_factory, **GQA_9_3, shard=True)
    assert (sharded / "model.safetensors.index.json").exists()
    one = model_costs(models["hf-9-3-untied"], ["int8"], [2])
    many = model_costs(sharded, ["int8"], [2])
    assert many.params == one.params and many.file_bytes == one.file_bytes
    assert many.splits == one.splits


def test_tied_gguf_counts_the_embedding_once(models):
    path = models["gguf-4-2-tied"]
    costs = model_costs(path, ["fp32"], [1])
    tensors = read_gguf(path).tensors
    assert "output.weight" not in tensors and costs.params["lm_head"] == 0
    assert costs.total_params == sum(int(np.prod(t.shape)) for t in tensors.values())


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_default_model_from_headers_alone(default_model_path, default_gguf_reader, capsys, monkeypatch):
    if not Path("/proc/self/io").exists():
        pytest.skip("bytes read are measured through /proc/self/io (Linux)")
    main(["inspect", "--model", str(default_model_path), "--json", "--tp", "1"])
    capsys.readouterr()  # the first run imports rich & co. (their files count as reads)
    read_gguf.cache_clear()
    # Belt and braces beside the counter: mapping tensor data would not show up in rchar.
    monkeypatch.setattr(np, "memmap", lambda *a, **k: pytest.fail("inspect mapped tensor data"))
    before = _rchar()
    rc = main(["inspect", "--model", str(default_model_path), "--json", "--tp", "1", "2", "3"])
    read = _rchar() - before
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    size = default_model_path.stat().st_size
    assert read < size / 20, f"inspect read {read} bytes of a {size}-byte file"
    expected = sum(int(t.n_elements) for t in default_gguf_reader.tensors)  # gguf-py's own reader
    assert out["parameters"]["total"] == expected
    assert 134.4e6 < expected < 134.6e6
    assert out["architecture"]["tie_word_embeddings"] is True and out["parameters"]["lm_head"] == 0


def test_json_output_has_the_fields(models, capsys):
    rc = main(["inspect", "--model", str(models["hf-9-3-untied"]), "--json", "--tp", "1", "2", "10",
               "--dtype", "fp32", "int8", "--max-model-len", "64", "--max-num-seqs", "3"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["weight_bytes"]) == {"fp32", "int8"}
    assert out["kv_cache"]["max_model_len"] == 64 and out["kv_cache"]["tokens"] == 3 * 64
    assert out["parameters"]["total"] == sum(out["parameters"][p] for p in PARTS)
    by_tp = {s["tp"]: s for s in out["tp"]}
    two = by_tp[2]
    assert two["possible"] and [r["q_heads"] for r in two["ranks"]] == [[0, 6], [6, 9]]  # uneven 9 heads
    assert [r["kv_heads"] for r in two["ranks"]] == [[0, 2], [2, 3]]
    assert set(two["ranks"][0]["weight_bytes"]["int8"]) == {"total", "sharded", "replicated"}
    assert set(two["fit"]) == {"fp32", "int8"} and isinstance(two["fit"]["int8"]["fits"], bool)
    ten = by_tp[10]
    assert (
        not ten["possible"] and ten["ranks"] == [] and "exceeds the model's 9 attention heads" in ten["error"]
    )
    assert out["memory"]["free_bytes"]["host"] > 0


def test_human_table_shows_splits_and_why_one_is_impossible(models, capsys):
    rc = main(["inspect", "--model", str(models["hf-9-3-untied"]), "--tp", "2", "10"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Does it fit?" in out and "impossible" in out
    assert "exceeds the model's 9 attention heads" in out.replace("\n", " ")
    assert f"{model_costs(models['hf-9-3-untied'], ['fp32'], [1]).total_params:,}" in out


def test_verdicts(models):
    costs = model_costs(models["hf-9-3-untied"], ["fp32"], [2], max_model_len=64, max_num_seqs=4)
    split = costs.splits[0]
    weights = sum(r.weights["fp32"].total for r in split.ranks)
    kv = sum(r.kv_cache_bytes for r in split.ranks)
    assert fit(split, "fp32", {"host": weights + kv}, costs).fits
    partial = fit(split, "fp32", {"host": weights + kv - 1}, costs)
    assert not partial.fits and partial.weights_fit and "KV does not" in partial.verdict
    none = fit(split, "fp32", {"host": weights - 1}, costs)
    assert not none.weights_fit and none.verdict.startswith("does not fit")
    gpus = fit(split, "fp32", {"cuda:0": 10**12, "cuda:1": 10**12}, costs)  # one rank per GPU
    assert gpus.need == {f"cuda:{r.rank}": r.total_bytes("fp32") for r in split.ranks}


@pytest.mark.parametrize("kind", ["text", "bad-gguf", "empty-dir", "missing"])
def test_bad_model_is_a_one_line_error(tmp_path, capsys, kind):
    target = {
        "text": tmp_path / "notes.txt",
        "bad-gguf": tmp_path / "x.gguf",
        "empty-dir": tmp_path / "dir",
        "missing": tmp_path / "nope.gguf",
    }[kind]
    if kind == "text":
        target.write_text("hello")
    elif kind == "bad-gguf":
        target.write_bytes(b"NOTGGUF" * 100)
    elif kind == "empty-dir":
        target.mkdir()
        (target / "config.json").write_text("{}")
    rc = main(["inspect", "--model", str(target)])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("shardserve: error:") and err.strip().count("\n") == 0, err
