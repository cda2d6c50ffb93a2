"""vLLM's command line on top of ours: `shardserve serve MODEL -tp 2 --config serve.yaml ...`.

A `vllm serve` line should start us with nothing changed but the program name. Our own flag names
stay (they are the Settings fields); this module adds what vLLM users type:
- the help groups of `vllm serve --help` (Frontend, ModelConfig, LoadConfig, ...), every Settings
  field in one of them (a test checks), and vLLM's spellings of our flags (`-tp`);
- `--config FILE.yaml`: every key a flag of the same name, the command line winning, as in vLLM;
- vLLM flags that mean nothing here: accepted with one warning line saying what we do instead;
  flags whose effect we cannot honour and that would change results: refused, with the reason.
  A value that asks for what we do anyway (`-pp 1`, `--kv-cache-dtype auto`) passes silently.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ForeignFlag:
    """A vLLM flag we do not have: `refuse` says why it cannot be honoured, else it is ignored."""

    names: tuple[str, ...]  # the flag and vLLM's aliases of it
    why: str  # what we do instead (ignored) or why not (refused)
    takes_value: bool = True
    refuse: bool = False
    same_as_ours: tuple[str, ...] = ()  # values asking for what we do anyway, silently accepted ({model})


_EAGER = "the model always runs eagerly (no CUDA graphs, no compilation)"
_CHUNKED = "prefill is always chunked under --max-num-batched-tokens"
_LLGUIDANCE = "constraints always compile with llguidance"
_LOG_PROMPTS = "--log-prompts logs prompts and outputs"
_TLS = "TLS is not served here: terminate it at a proxy or an ingress"
_GENERATE = "only text generation is served"
_LORA = "LoRA adapters are not supported"

FOREIGN_FLAGS = (
    ForeignFlag(("--gpu-memory-utilization",), "the KV cache takes --kv-cache-memory-fraction of free memory, or --kv-cache-tokens"),
    ForeignFlag(("--trust-remote-code",), "no model code is ever run: the architectures are built in", False),
    ForeignFlag(("--enable-auto-tool-choice",), "tool calls are always read back with --tool-call-parser when a request has tools", False),
    ForeignFlag(("--disable-log-requests",), "prompts and outputs are never logged unless --log-prompts", False),
    ForeignFlag(("--enable-log-requests",), _LOG_PROMPTS, False),
    ForeignFlag(("--enable-log-outputs",), _LOG_PROMPTS, False),
    ForeignFlag(("--disable-log-stats",), "statistics are served at /metrics, never logged periodically", False),
    ForeignFlag(("--enforce-eager",), _EAGER, False),
    ForeignFlag(("--compilation-config", "-O"), _EAGER),
    ForeignFlag(("--max-seq-len-to-capture",), _EAGER),
    ForeignFlag(("--swap-space",), "preempted sequences are recomputed, never swapped out"),
    ForeignFlag(("--cpu-offload-gb",), "weights stay in the device's memory, one arena per rank"),
    ForeignFlag(("--enable-chunked-prefill",), _CHUNKED, False),
    ForeignFlag(("--no-enable-chunked-prefill",), _CHUNKED, False),
    ForeignFlag(("--uvicorn-log-level",), "--log-level sets every logger, Uvicorn's included"),
    ForeignFlag(("--disable-uvicorn-access-log",), "the access log is ours (structured, at --log-level info)", False),
    ForeignFlag(("--distributed-executor-backend",), "ranks are always processes (torch.distributed with --dist-init across machines)"),
    ForeignFlag(("--disable-custom-all-reduce",), "the all-reduce is ours: shared memory on a CPU, NCCL on CUDA", False),
    ForeignFlag(("--max-parallel-loading-workers",), "each rank reads only its own slices, one tensor at a time"),
    ForeignFlag(("--structured-outputs-config",), _LLGUIDANCE),
    ForeignFlag(("--guided-decoding-backend",), _LLGUIDANCE),
    ForeignFlag(("--disable-frontend-multiprocessing",), "the HTTP server and the engine share one process; ranks are processes", False),
    ForeignFlag(("--tokenizer-mode",), "the tokenizer is the model's own (tokenizer.json, or the GGUF's)", same_as_ours=("auto", "hf")),
    ForeignFlag(("--code-revision",), "no model code is ever run"),
    ForeignFlag(("--speculative-config",), "no speculative decoding: outputs are the same without it, only slower"),
    ForeignFlag(("--otlp-traces-endpoint",), "no tracing: per-request timings are histograms at /metrics"),
    ForeignFlag(("--max-log-len",), "prompts are never logged unless --log-prompts"),
    ForeignFlag(("--pipeline-parallel-size", "-pp"), "pipeline parallelism is not implemented; use --tp (ranks on several machines: --dist-init)", refuse=True, same_as_ours=("1",)),
    ForeignFlag(("--data-parallel-size", "-dp"), "run more replicas behind a load balancer (deploy/k8s) instead", refuse=True, same_as_ours=("1",)),
    ForeignFlag(("--quantization", "-q"), "pre-quantized checkpoints (AWQ, GPTQ, FP8, ...) are not loaded; --dtype int8 quantizes any checkpoint to weight-only INT8", refuse=True, same_as_ours=("gguf",)),
    ForeignFlag(("--kv-cache-dtype",), "the KV cache dtype follows --dtype (fp32, or fp16 under the C++ kernels)", refuse=True, same_as_ours=("auto",)),
    ForeignFlag(("--tokenizer",), "the tokenizer is always the model's own (tokenizer.json beside the weights, or the GGUF's)", refuse=True, same_as_ours=("{model}",)),
    ForeignFlag(("--tokenizer-revision",), "the tokenizer is always the model's own, at --revision", refuse=True, same_as_ours=("{revision}",)),
    ForeignFlag(("--load-format",), "weights load from safetensors or GGUF files", refuse=True, same_as_ours=("auto", "safetensors", "gguf")),
    ForeignFlag(("--hf-overrides",), "the model's config.json is served as it is; edit a copy to change it", refuse=True),
    ForeignFlag(("--enable-lora",), _LORA, False, refuse=True),
    ForeignFlag(("--lora-modules",), _LORA, refuse=True),
    ForeignFlag(("--reasoning-parser",), "reasoning is not split out of the content (no reasoning_content)", refuse=True),
    ForeignFlag(("--ssl-keyfile",), _TLS, refuse=True),
    ForeignFlag(("--ssl-certfile",), _TLS, refuse=True),
    ForeignFlag(("--task",), _GENERATE, refuse=True, same_as_ours=("auto", "generate")),
    ForeignFlag(("--runner",), _GENERATE, refuse=True, same_as_ours=("auto", "generate")),
)  # fmt: skip


def add_foreign_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "vLLM flags", "accepted for a vLLM command line: ignored with a warning, or refused when honouring "
        "them is impossible and ignoring them would change results",
    )  # fmt: skip
    for flag in FOREIGN_FLAGS:
        kind = "refused" if flag.refuse else "ignored"
        how = {"metavar": "VALUE"} if flag.takes_value else {"action": "store_const", "const": True}
        group.add_argument(
            *flag.names, dest="foreign:" + flag.names[0], default=argparse.SUPPRESS, help=f"{kind}: {flag.why}",
            **how,
        )  # fmt: skip


def check_foreign_flags(ns: argparse.Namespace, model: str | None, revision: str | None) -> list[str]:
    """One warning line per ignored flag given; ValueError naming the first refused one."""
    warnings = []
    for flag in FOREIGN_FLAGS:
        value = vars(ns).get("foreign:" + flag.names[0])
        if value is None:
            continue
        ours = {v.format(model=model, revision=revision or "main") for v in flag.same_as_ours}
        if isinstance(value, str) and value in ours:
            continue
        if flag.refuse:
            raise ValueError(f"{flag.names[0]} {value} is not supported: {flag.why}")
        warnings.append(f"{flag.names[0]} is ignored: {flag.why}")
    return warnings


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
