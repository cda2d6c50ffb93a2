"""The command line: generate end to end, and one-line errors for bad models."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from app.engine.types import GenerateRequest, SamplingParams
from app.settings import Settings
from app.stack import build_stack
from tests.support.models import tiny_gguf, tiny_llama


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHARDSERVE_KV_CACHE_TOKENS": "2048"}
    return subprocess.run(
        [sys.executable, "-m", "app", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_generate_prints_the_greedy_continuation(tmp_path_factory):
    path = tiny_llama(tmp_path_factory)
    r = _cli(
        "generate",
        "--model",
        str(path),
        "--dtype",
        "fp32",
        "--prompt",
        "The quick brown",
        "--max-tokens",
        "8",
    )
    assert r.returncode == 0, r.stderr
    assert "finish: length" in r.stderr and "8 tokens" in r.stderr


def _assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("shardserve: error:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0]


def test_truncated_gguf(tmp_path_factory, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf(tmp_path_factory, "F32").read_bytes()[:5000])
    _assert_one_line_error(_cli("generate", "--model", str(bad), "--prompt", "x"), str(bad), "truncated")


def test_directory_without_weights(tmp_path_factory, tmp_path):
    src = tiny_llama(tmp_path_factory)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    _assert_one_line_error(_cli("generate", "--model", str(tmp_path), "--prompt", "x"), "safetensors")


def test_unknown_architecture(tmp_path_factory, tmp_path):
    src = tiny_llama(tmp_path_factory)
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = _cli("generate", "--model", str(tmp_path), "--prompt", "x")
    _assert_one_line_error(r, "config.json", "MysteryForCausalLM", "supported: llama")


def test_missing_tokenizer(tmp_path_factory, tmp_path):
    src = tiny_llama(tmp_path_factory)
    for f in src.iterdir():
        if not f.name.startswith("tokenizer"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    _assert_one_line_error(
        _cli("generate", "--model", str(tmp_path), "--prompt", "x"), str(tmp_path), "tokenizer"
    )


def test_not_a_model_path(tmp_path):
    _assert_one_line_error(
        _cli("generate", "--model", str(tmp_path / "nope.bin"), "--prompt", "x"), "nope.bin"
    )


def test_debug_shows_the_traceback(tmp_path):
    r = _cli("--debug", "generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "x")
    assert r.returncode != 0 and "Traceback" in r.stderr


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
]


def test_default_model_greedy_equals_transformers(default_model_path):
    """In fp32, 32-token greedy chat continuations through the whole engine equal transformers'."""
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    settings = Settings(model=str(default_model_path), dtype="fp32", kv_cache_tokens=4096, max_model_len=2048)
    stack = build_stack(settings, on_outputs=outputs.put)
    tok = stack.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
        for p in PROMPTS
    ]
    stack.start()
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    try:
        for i, ids in enumerate(prompts):  # all at once: batched, and still equal to the reference
            params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
            stack.engine.add_request(GenerateRequest(str(i), tuple(ids), params, time.monotonic()))
        done = 0
        while done < len(prompts):
            for out in outputs.get(timeout=120):
                got[out.request_id].extend(out.token_ids)
                done += out.finish_reason is not None
    finally:
        stack.shutdown()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, dtype=torch.float32
    ).eval()
    for i, ids in enumerate(prompts):
        expected = ref.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
        assert got[str(i)] == expected, PROMPTS[i]


def test_python_dash_m_help():
    r = _cli("serve", "--help")
    assert r.returncode == 0
    for flag in (
        "--model",
        "--dtype",
        "--tp",
        "--max-num-seqs",
        "--api-key",
        "--shutdown-grace",
        "--dist-init",
    ):
        assert flag in r.stdout
    assert "SHARDSERVE_MAX_NUM_SEQS" in r.stdout


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_API_KEY", "k1,k2")
    monkeypatch.setenv("SHARDSERVE_TP", "2")
    s = Settings(tp=3)
    assert s.api_key == ["k1", "k2"] and s.tp == 3  # flags (init values) win over the environment
    assert Path(Settings(home="/x").home) == Path("/x")
