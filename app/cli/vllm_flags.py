"""vLLM's command line on top of ours: `shardserve serve MODEL -tp 2 --config serve.yaml ...`.

A `vllm serve` line should start us with nothing changed but the program name. Our own flag names
stay (they are the Settings fields); this module adds what vLLM users type:
- the help groups of `vllm serve --help` (Frontend, ModelConfig, LoadConfig, ...), every Settings
  field in one of them (a test checks), and vLLM's spellings of our flags (`-tp`);
- `--config FILE.yaml`: every key a flag of the same name, the command line winning, as in vLLM;
- vLLM's parser spellings: underscores in flag names, a JSON flag's keys one at a time.
Its flags that we do not have (ignored with a warning, or refused) are app/cli/foreign_flags.py.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path

# vLLM's help groups, in its order; the fields of ours that belong to each
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "Frontend": ("host", "port", "uds", "root_path", "api_key", "api_key_file", "allowed_origins",
                 "allow_credentials", "allowed_methods", "allowed_headers", "disable_fastapi_docs",
                 "enable_request_id_headers", "chat_template", "tool_call_parser", "max_request_bytes",
                 "request_head_timeout", "max_connections", "request_timeout", "shutdown_grace", "log_level",
                 "log_prompts", "response_role", "return_tokens_as_token_ids", "enable_force_include_usage",
                 "enable_prompt_tokens_details", "default_chat_template_kwargs"),
    "ModelConfig": ("model", "served_model_name", "dtype", "max_model_len", "seed", "revision", "hf_token",
                    "generation_config", "override_generation_config", "max_logprobs", "logprobs_mode"),
    "LoadConfig": ("download_dir", "home"),
    "ParallelConfig": ("tp", "local_ranks", "dist_init", "step_timeout", "rank_death_timeout",
                       "pool_max_restarts"),
    "CacheConfig": ("block_size", "kv_cache_tokens", "kv_cache_memory_fraction", "kv_cache_memory_bytes",
                    "enable_prefix_caching"),
    "SchedulerConfig": ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests", "max_queued_tokens"),
    "DeviceConfig": ("device", "kernels"),
}  # fmt: skip
GROUP_HELP = {
    "Frontend": "the OpenAI-compatible HTTP server",
    "ModelConfig": "which model, and how it computes",
    "LoadConfig": "where models are cached",
    "ParallelConfig": "tensor-parallel ranks (processes) and their supervision",
    "CacheConfig": "the paged KV cache",
    "SchedulerConfig": "continuous batching and admission",
    "DeviceConfig": "compute device and CPU kernels",
}
FLAG_ALIASES = {  # vLLM's spellings of our flags
    "tp": ("-tp", "--tensor-parallel-size"),
    "max_queued_requests": ("--max-num-queued-reqs",),
    "max_queued_tokens": ("--max-num-queued-tokens",),
    "shutdown_grace": ("--shutdown-timeout",),
}
CONFIG_MODEL = "--config-model"  # a config file's `model`, hidden from --help


def vllm_spellings(argv: Sequence[str]) -> list[str]:
    """What vLLM's parser accepts beyond argparse, after `serve`: underscores in flag names
    (`--max_model_len`), and a JSON flag's keys one by one (`--compilation-config.mode 3`,
    `-cc.mode=3`, `--override-generation-config.temperature=0.5`), merged into one JSON value."""
    argv = list(argv)
    if "serve" not in argv:
        return argv
    at = argv.index("serve") + 1
    out, i = argv[:at], at
    merged: dict[str, dict] = {}  # flag -> its keys so far
    where: dict[str, int] = {}  # flag -> index in `out` of its JSON value
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, value = arg.partition("=")
        flag, dot, path = name.partition(".")
        if not flag.startswith("-") or not flag.lstrip("-")[:1].isalpha():  # a value, `--`, `-1`
            out.append(arg)
            continue
        if flag.startswith("--"):
            flag = flag.replace("_", "-")
        if not dot:
            out.append(flag + eq + value)
            continue
        if not eq and i < len(argv) and not argv[i].startswith("-"):
            value, i = argv[i], i + 1
        if flag not in merged:
            merged[flag], where[flag] = {}, len(out) + 1
            out += [flag, ""]
        node = merged[flag]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = _json_or_text(value)
    for flag, keys in merged.items():
        out[where[flag]] = json.dumps(keys)
    return out


def _json_or_text(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value


def expand_config(argv: Sequence[str], negatable: Collection[str] = ()) -> list[str]:
    """`serve --config FILE.yaml`: the file's keys become flags placed right after `serve`, so the
    command line wins over the file, as in vLLM. Keys are flag names (`tensor-parallel-size` or
    `tensor_parallel_size`); true is a bare flag, false `--no-FLAG` for the `negatable` flags and
    nothing for the others (off is their default), a list repeats the flag, a mapping
    (--override-generation-config) is passed as JSON."""
    argv = list(argv)
    if "serve" not in argv:
        return argv
    at = argv.index("serve")
    for i, arg in enumerate(argv[at + 1 :], at + 1):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i : i + (1 if "=" in arg else 2)]
            return [*argv[: at + 1], *_config_args(path, negatable), *argv[at + 1 :]]
    return argv


def _config_args(path: str, negatable: Collection[str]) -> list[str]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    args: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag == "--model":  # below a model on the command line, positional or not
            flag = CONFIG_MODEL
        if value is True:
            args.append(flag)
        elif value is False:
            args += ["--no-" + flag[2:]] if flag in negatable else []
        # `--flag=value`: exactly one value, so a list flag (nargs="+") never takes the command line's
        # positional model that follows the file's flags as one more of its values
        elif isinstance(value, list):
            args += [f"{flag}={item}" for item in value]
        elif isinstance(value, dict):
            args.append(f"{flag}={json.dumps(value)}")
        elif value is not None:
            args.append(f"{flag}={value}")
    return args
