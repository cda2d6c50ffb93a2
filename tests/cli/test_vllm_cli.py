"""vLLM's command line: positional model, its spellings, --config YAML, its flags we ignore or refuse,
the help groups, --generation-config / --override-generation-config; and one real `serve` of a hub id
from an offline cache with a vLLM-style command line, driven with the official openai client."""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest

from app.cli import build_parser, main, parse_args
from app.cli.foreign_flags import FOREIGN_FLAGS
from app.cli.vllm_flags import HELP_GROUPS
from app.model.generation_config import sampling_defaults
from app.model.store import BUILTIN_MODELS, DEFAULT_MODEL, builtin_entry, builtin_path
from app.settings import Settings
from tests.support.api_server import ServeProcess
from tests.support.hf_cache import lay_out_hub_cache, model_files
from tests.support.models import tiny_llama

REPO = "tiny-org/tiny-llama"
VLLM_FLAGS = json.loads((Path(__file__).parent / "data" / "vllm_0.32_serve_flags.json").read_text())["flags"]


def parse(*argv: str) -> tuple[Settings, list[str]]:
    _, settings, warnings = parse_args(["serve", *argv])
    return settings, warnings


def test_positional_model_tp_and_dtype_spellings():
    s, warnings = parse("org/m", "-tp", "2", "--dtype", "bfloat16")
    assert (s.model, s.tp, s.dtype, warnings) == ("org/m", 2, "bf16", [])
    assert parse("--tensor-parallel-size", "3")[0].tp == 3
    for vllm, ours in {
        "float16": "fp16",
        "half": "fp16",
        "float32": "fp32",
        "float": "fp32",
        "auto": "auto",
    }.items():
        assert parse("--dtype", vllm)[0].dtype == ours
    assert parse("m", "--model", "m")[0].model == "m"
    with pytest.raises(ValueError, match="two models"):
        parse("a", "--model", "b")


def test_dtype_spellings_from_the_environment(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_DTYPE", "half")
    assert Settings().dtype == "fp16"


def test_config_file_takes_every_flag_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "model: org/m\ntensor-parallel-size: 2\nport: 9001\nmax_num_seqs: 5\nenable-prefix-caching: false\n"
        "log-prompts: true\napi-key: [k1, k2]\noverride-generation-config: {temperature: 0.5}\n"
        "trust-remote-code: true\nenforce-eager: false\n"
    )
    s, warnings = parse("--config", str(cfg), "--port", "9002")
    assert (s.model, s.tp, s.port, s.max_num_seqs) == ("org/m", 2, 9002, 5)
    assert not s.enable_prefix_caching and s.log_prompts and s.api_key == ["k1", "k2"]
    assert s.override_generation_config == {"temperature": 0.5}
    assert warnings == [
        "--trust-remote-code is ignored: no model code is ever run: the architectures are built in"
    ]
    assert parse(f"--config={cfg}", "other/m")[0].model == "other/m"


def test_a_config_file_with_an_unknown_key_or_bad_yaml_is_refused(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("no-such-flag: 1\n")
    (tmp_path / "b.yaml").write_text("[1, 2\n")
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(tmp_path / "a.yaml")])
    assert "--no-such-flag" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "b.yaml")]) == 2
    assert "--config" in capsys.readouterr().err


def test_meaningless_vllm_flags_warn_once_each_and_unhonourable_ones_are_refused():
    _, warnings = parse("--gpu-memory-utilization", "0.9", "--trust-remote-code", "--enable-auto-tool-choice",
                        "--disable-log-requests", "--swap-space", "4", "-pp", "1", "--kv-cache-dtype", "auto",
                        "--tokenizer", "org/m", "org/m", "--load-format", "safetensors",
                        "--tokenizer-revision", "main", "--max-seq-len-to-capture", "8")  # fmt: skip
    assert [w.split(" ")[0] for w in warnings] == [
        "--gpu-memory-utilization", "--trust-remote-code", "--enable-auto-tool-choice",
        "--disable-log-requests", "--max-seq-len-to-capture", "--swap-space",
    ]  # fmt: skip
    assert all(" is ignored: " in w and "\n" not in w for w in warnings)
    for argv, reason in (
        (["-pp", "2"], "pipeline parallelism"),
        (["--quantization", "awq"], "--dtype int8"),
        (["--kv-cache-dtype", "fp8"], "follows --dtype"),
        (["--tokenizer", "other/tok", "org/m"], "model's own"),
        (["--tokenizer-revision", "v2", "--revision", "v1"], "at --revision"),
        (["--enable-lora"], "LoRA"),
    ):
        with pytest.raises(ValueError, match=reason):
            parse(*argv)


def serve_options() -> set[str]:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return {option for action in serve._actions for option in action.option_strings}


def test_every_flag_of_vllm_serve_is_known():
    """vLLM 0.32's whole `vllm serve` command line (read from its own parser): each option is ours,
    an alias of ours, or a foreign flag we ignore or refuse; none is an argparse error."""
    known = serve_options()
    unknown = [
        o for flag in VLLM_FLAGS for o in flag["options"] if o not in known and o not in ("-h", "--help")
    ]
    assert unknown == []


def test_each_foreign_vllm_flag_warns_or_is_refused_naming_itself():
    ours = {o for name in Settings.model_fields for o in build_parser_options_of(name)}
    for flag in VLLM_FLAGS:
        option = flag["options"][0]
        if option in ours or option in ("-h", "--help", "--config"):
            continue
        argv = ["org/m", option, *(["1"] if flag["takes_value"] else [])]
        try:
            _, warnings = parse(*argv)
        except ValueError as e:
            assert str(e).startswith(option + " ") and " is not supported: " in str(e), e
            continue
        # silent only where the value asks for what we do anyway (-pp 1, --nnodes 1, ...)
        assert len(warnings) <= 1 and all(w.startswith(f"{option} is ignored: ") for w in warnings), warnings


def build_parser_options_of(field: str) -> list[str]:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return [o for action in serve._actions if action.dest == field for o in action.option_strings]


def test_vllm_spellings_underscores_and_json_keys():
    s, warnings = parse("org/m", "--max_num_seqs", "5", "--override-generation-config.temperature", "0.5",
                        "--override_generation_config.top_p=0.9", "--compilation-config.mode", "3",
                        "-cc.cudagraph_capture_sizes=[1,2]", "-O3")  # fmt: skip
    assert s.max_num_seqs == 5
    assert s.override_generation_config == {"temperature": 0.5, "top_p": 0.9}
    assert [w.split(" ")[0] for w in warnings] == ["--compilation-config", "--optimization-level"]
    assert warnings[0].count("--compilation-config") == 1  # the two spellings are one flag, one warning
    with pytest.raises(ValueError, match="unknown key"):
        parse("--override-generation-config.temprature", "1")
    # a refused switch given off asks for what we do: silent, as is its value that means ours
    assert parse("--no-enable-lora", "--no-headless", "-dp", "1", "--scheduling-policy", "fcfs")[1] == []
    with pytest.raises(ValueError, match="--scheduling-policy priority"):
        parse("--scheduling-policy", "priority")


def test_a_refusal_through_main_is_one_line(capsys):
    assert main(["serve", "--data-parallel-size", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "shardserve: error: --data-parallel-size 2 is not supported: run more replicas behind a load "
        "balancer (deploy/k8s) instead"
    )


def test_help_groups_as_vllm():
    fields = [f for group in HELP_GROUPS.values() for f in group]
    assert sorted(fields) == sorted(Settings.model_fields), "every setting in exactly one group"
    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    titles = [t for t in re.findall(r"^(\w[\w ]*):$", text, re.M) if t in HELP_GROUPS]
    assert titles == list(HELP_GROUPS)  # vLLM's order: Frontend, ModelConfig, ...
    assert "-tp TP, --tensor-parallel-size TP" in text and "--config FILE.yaml" in text
    for flag in FOREIGN_FLAGS:
        assert flag.names[0] in text


def test_vllm_frontend_flags_parse_from_the_command_line_a_config_file_and_the_environment(
    tmp_path, monkeypatch, capsys
):
    s, warnings = parse(
        "--response-role", "bot", "--max-logprobs", "-1", "--logprobs-mode", "processed_logits",
        "--return-tokens-as-token-ids", "--enable-force-include-usage", "--enable-prompt-tokens-details",
        "--default-chat-template-kwargs", '{"enable_thinking": false}',
    )  # fmt: skip
    assert (s.response_role, s.max_logprobs, s.logprobs_mode, warnings) == ("bot", -1, "processed_logits", [])
    assert s.return_tokens_as_token_ids and s.enable_force_include_usage and s.enable_prompt_tokens_details
    assert s.default_chat_template_kwargs == {"enable_thinking": False}
    defaults = parse()[0]  # vLLM's defaults
    assert (defaults.response_role, defaults.max_logprobs, defaults.logprobs_mode) == (
        "assistant",
        20,
        "raw_logprobs",
    )
    assert not (defaults.return_tokens_as_token_ids or defaults.enable_force_include_usage)
    assert not defaults.enable_prompt_tokens_details and defaults.default_chat_template_kwargs == {}
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "default-chat-template-kwargs: {enable_thinking: false}\nreturn_tokens_as_token_ids: true\n"
    )
    s = parse("--config", str(cfg))[0]
    assert s.default_chat_template_kwargs == {"enable_thinking": False} and s.return_tokens_as_token_ids
    monkeypatch.setenv("SHARDSERVE_DEFAULT_CHAT_TEMPLATE_KWARGS", '{"x": [1]}')
    monkeypatch.setenv("SHARDSERVE_MAX_LOGPROBS", "5")
    assert (Settings().default_chat_template_kwargs, Settings().max_logprobs) == ({"x": [1]}, 5)
    monkeypatch.delenv("SHARDSERVE_DEFAULT_CHAT_TEMPLATE_KWARGS")
    for bad, words in [
        (["--default-chat-template-kwargs", "[1]"], "--default-chat-template-kwargs: not a JSON object"),
        (["--default-chat-template-kwargs", "{x"], "--default-chat-template-kwargs: not a JSON object"),
        (["--max-logprobs", "-2"], "--max-logprobs: "),
    ]:
        assert main(["serve", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("shardserve: error: " + words) and "\n" not in err
    with pytest.raises(SystemExit):  # vLLM's four modes, nothing else
        parse("--logprobs-mode", "logits")
    assert "invalid choice" in capsys.readouterr().err


def test_generation_config_choices(tmp_path_factory, tmp_path):
    model = tiny_llama(tmp_path_factory)
    other = tmp_path / "gen"
    other.mkdir()
    (other / "generation_config.json").write_text(
        json.dumps({"temperature": 0.7, "max_new_tokens": 9, "do_sample": True})
    )
    assert sampling_defaults("auto", {}, model)[0] == {}  # the tiny model has no generation_config.json
    assert sampling_defaults(str(other), {}, model)[0] == {"temperature": 0.7, "max_tokens": 9}
    assert sampling_defaults(str(other), {"top_p": 0.5}, model)[0] == {
        "temperature": 0.7,
        "max_tokens": 9,
        "top_p": 0.5,
    }
    assert sampling_defaults("vllm", {"temperature": 0.1}, model)[0] == {"temperature": 0.1}
    # the built-in GGUF carries no generation config: its registry entry has the model card's
    home = tmp_path / "home"
    entry = builtin_entry(DEFAULT_MODEL, builtin_path(DEFAULT_MODEL, home))
    assert entry is BUILTIN_MODELS[DEFAULT_MODEL]
    assert builtin_entry(
        "/elsewhere/" + entry.filename, builtin_path(DEFAULT_MODEL, home).parent / entry.filename
    )
    gguf = builtin_path(DEFAULT_MODEL, home)
    assert sampling_defaults("auto", {}, gguf, entry.generation_defaults)[0] == {
        "temperature": 0.2,
        "top_p": 0.9,
    }
    assert sampling_defaults("vllm", {}, gguf, entry.generation_defaults)[0] == {}
    for bad, what in (({"generation_config": str(tmp_path)}, "generation_config.json"),
                      ({"override_generation_config": '{"temprature": 1}'}, "unknown key")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            Settings(**bad)


@pytest.mark.timeout(240)
def test_vllm_style_serve_of_a_hub_id_from_an_offline_cache(tmp_path_factory, tmp_path):
    """`shardserve serve ORG/NAME --config serve.yaml -tp 1 --dtype float32 ...` as a user types it:
    the model from huggingface_hub's cache with the Hub off, its generation_config.json applied
    where a request is silent, one warning per meaningless flag, a ready line after Uvicorn's."""
    files = model_files(tiny_llama(tmp_path_factory))
    files["generation_config.json"] = json.dumps({"temperature": 0.9, "max_new_tokens": 6}).encode()
    lay_out_hub_cache(tmp_path / "hub", REPO, files)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("dtype: float32\nkv-cache-tokens: 4096\nmax-num-seqs: 4\ntrust-remote-code: true\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    args = (REPO, "--config", str(cfg), "-tp", "1", "--override-generation-config", '{"temperature": 0}',
            "--gpu-memory-utilization", "0.9", "--enable-auto-tool-choice")  # fmt: skip
    with ServeProcess(*args, env=env) as srv:
        srv.wait_ready()
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == [REPO]
        silent = client.completions.create(model=REPO, prompt="a b c")
        greedy = client.completions.create(model=REPO, prompt="a b c", temperature=0)
        hot = client.completions.create(model=REPO, prompt="a b c", temperature=2, seed=1, max_tokens=12)
        # generation_config.json's max_new_tokens, the override's temperature 0: greedy, 6 tokens
        assert silent.usage.completion_tokens == 6 and silent.choices[0].text == greedy.choices[0].text
        assert hot.usage.completion_tokens == 12
    out = srv.output
    lines = out.splitlines()
    warned = [ln for ln in lines if "WARNING" in ln and " is ignored: " in ln]
    assert [ln.split("WARNING shardserve: ")[1].split(" ")[0] for ln in warned] == [
        "--gpu-memory-utilization", "--trust-remote-code", "--enable-auto-tool-choice"
    ]  # fmt: skip
    ready = next(i for i, ln in enumerate(lines) if "ready: " + REPO in ln)
    assert ready > next(i for i, ln in enumerate(lines) if "Application startup complete" in ln)
    assert f"playground {srv.url}/, API docs {srv.url}/docs" in lines[ready]
    assert re.search(r"MiB reserved, \d+\.\d MiB resident", out)
    assert "sampling defaults where a request is silent" in out and "temperature=0" in out
    assert "Traceback" not in out
