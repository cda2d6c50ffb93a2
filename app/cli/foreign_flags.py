"""vLLM's flags that we do not have, every one of `vllm serve` 0.32's (tests/cli/data holds its
whole list; a test checks that each is ours, an alias of ours, or here).

Ignored, with one warning line saying what we do instead, where ignoring them changes no result;
refused, with the reason, where honouring them is impossible and ignoring them would change results
or break a promise. A value that asks for what we do anyway (`-pp 1`, `--kv-cache-dtype auto`,
`--no-enable-lora`) passes silently."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class ForeignFlag:
    """A vLLM flag we do not have: `refuse` says why it cannot be honoured, else it is ignored."""

    names: tuple[str, ...]  # the flag and vLLM's aliases of it
    why: str  # what we do instead (ignored) or why not (refused)
    switch: bool = False  # takes no value: `--flag` / `--no-flag`, seen as "true" / "false"
    refuse: bool = False
    same_as_ours: tuple[str, ...] = ()  # values asking for what we do anyway, accepted silently

    @property
    def dest(self) -> str:
        return "foreign:" + self.names[0]


def _table(entries: dict[str, str | tuple[str, ...]], refuse: bool) -> tuple[ForeignFlag, ...]:
    """Flags written as vLLM's help shows them: "--[no-]x" is a switch, "|" separates aliases; the
    value is the reason, or (reason, values that ask for what we do anyway: {model}, {revision})."""
    flags = []
    for spec, value in entries.items():
        why, *same = (value,) if isinstance(value, str) else value
        names = tuple(spec.replace("[no-]", "").split("|"))
        flags.append(ForeignFlag(names, why, "[no-]" in spec, refuse, tuple(same)))
    return tuple(flags)


_GPU = "nothing to set on a CPU"
_EAGER = "the model always runs eagerly (no CUDA graphs, no compilation)"
_CHUNKED = "prefill is always chunked under --max-num-batched-tokens"
_LLGUIDANCE = "constraints always compile with llguidance"
_LOG_PROMPTS = "--log-prompts logs prompts and outputs"
_LOGGING = "--log-level sets every logger; logs go to stderr"
_METRICS = "the metrics are served at /metrics"
_TLS = "TLS is not served here: terminate it at a proxy or an ingress"
_GENERATE = "only text generation is served"
_LORA = "LoRA adapters are not supported"
_TEXT_ONLY = "requests are text only (no images, audio or video)"
_MOE = "no mixture-of-experts models are served"
_DP = "one replica per server: run more behind a load balancer (deploy/k8s)"
_MAMBA = "no state-space (Mamba) models are served"
_KERNELS = "the compute path is --kernels (our CPU kernels) or torch on CUDA"
_SPEC = "no speculative decoding: outputs are the same without it, only slower"
_SCHED = "one continuous-batching scheduler, bounded by --max-num-seqs and --max-num-batched-tokens"
_OFFLOAD = "weights stay in the device's memory, one arena per rank"
_LOADING = "each rank reads only its own slices of the safetensors or GGUF files, one tensor at a time"
_MULTINODE = "ranks on other machines join with `shardserve rank --dist-init`"
_CODE = "no code is imported from the command line"
_ENDPOINTS = "only the OpenAI-compatible endpoints are served"
_KV = "the paged KV cache is sized by --kv-cache-tokens or --kv-cache-memory-fraction"
_TRANSFER = "prefill and decode run in one server; no KV or encoder transfer"
_REASONING = "reasoning is not split out of the content (no reasoning_content)"

# ignoring these changes no result
IGNORED: dict[str, str | tuple[str, ...]] = {
    "--gpu-memory-utilization|--device-memory-utilization": "the KV cache takes --kv-cache-memory-fraction of free memory, or --kv-cache-tokens",
    "--[no-]trust-remote-code": "no model code is ever run: the architectures are built in",
    "--[no-]enable-auto-tool-choice": "tool calls are always read back with --tool-call-parser when a request has tools",
    "--[no-]disable-log-requests": "prompts and outputs are never logged unless --log-prompts",
    "--[no-]enable-log-requests": _LOG_PROMPTS,
    "--[no-]enable-log-outputs": _LOG_PROMPTS,
    "--[no-]enable-log-deltas": _LOG_PROMPTS,
    "--max-log-len": "prompts are never logged unless --log-prompts",
    "--[no-]disable-log-stats": "statistics are served at /metrics, never logged periodically",
    "--[no-]aggregate-engine-logging": "statistics are served at /metrics, never logged periodically",
    "--[no-]enforce-eager": _EAGER,
    "--compilation-config|-cc": _EAGER,
    "--optimization-level|-O": _EAGER,
    "--max-seq-len-to-capture": _EAGER,
    "--cudagraph-capture-sizes": _EAGER,
    "--max-cudagraph-capture-size": _EAGER,
    "--[no-]cudagraph-metrics": _EAGER,
    "--swap-space": "preempted sequences are recomputed, never swapped out",
    "--cpu-offload-gb": _OFFLOAD,
    "--cpu-offload-params": _OFFLOAD,
    "--offload-backend": _OFFLOAD,
    "--offload-group-size": _OFFLOAD,
    "--offload-num-in-group": _OFFLOAD,
    "--offload-prefetch-step": _OFFLOAD,
    "--offload-params": _OFFLOAD,
    "--kv-offloading-size": _KV,
    "--kv-offloading-backend": _KV,
    "--num-gpu-blocks-override": _KV,
    "--kv-cache-dtype-skip-layers": "the KV cache dtype follows --dtype in every layer",
    "--[no-]kv-sharing-fast-prefill": _KV,
    "--prefix-caching-hash-algo": "prefix blocks are matched by their token ids, compared exactly",
    "--prefix-cache-retention-interval": "cached prefix blocks are kept until their memory is needed (LRU)",
    "--prefix-match-unit": "prefix blocks are matched in --block-size units",
    "--[no-]enable-chunked-prefill": _CHUNKED,
    "--[no-]disable-chunked-mm-input": _TEXT_ONLY,
    "--long-prefill-token-threshold": _CHUNKED,
    "--[no-]long-prefill-token-threshold-adaptive": _CHUNKED,
    "--max-num-partial-prefills": _CHUNKED,
    "--max-long-partial-prefills": _CHUNKED,
    "--max-num-scheduled-tokens": _SCHED,
    "--max-num-active-seqs": _SCHED,
    "--[no-]scheduler-reserve-full-isl": _SCHED,
    "--watermark": _SCHED,
    "--prefill-schedule-interval": _SCHED,
    "--[no-]async-scheduling": _SCHED,
    "--[no-]disable-hybrid-kv-cache-manager": _KV,
    "--stream-interval": "each token is streamed as soon as it is sampled",
    "--uvicorn-log-level": "--log-level sets every logger, Uvicorn's included",
    "--[no-]disable-uvicorn-access-log": "the access log is ours (structured, at --log-level info)",
    "--disable-access-log-for-endpoints": "the access log is ours (structured, at --log-level info)",
    "--logging-config": _LOGGING,
    "--log-config-file": _LOGGING,
    "--[no-]log-error-stack": "--debug shows tracebacks",
    "--[no-]enable-logging-iteration-details": _METRICS,
    "--[no-]enable-per-request-metrics": _METRICS,
    "--[no-]enable-server-load-tracking": _METRICS,
    "--show-hidden-metrics-for-version": _METRICS,
    "--per-request-spec-decode-metrics": _SPEC,
    "--[no-]kv-cache-metrics": _METRICS,
    "--kv-cache-metrics-sample": _METRICS,
    "--custom-histogram-buckets": _METRICS,
    "--[no-]enable-mfu-metrics": _METRICS,
    "--otlp-traces-endpoint": "no tracing: per-request timings are histograms at /metrics",
    "--collect-detailed-traces": "no tracing: per-request timings are histograms at /metrics",
    "--[no-]enable-layerwise-nvtx-tracing": _GPU,
    "--profiler-config": "no profiler endpoints; `shardserve bench` measures",
    "--jit-monitor-mode": _EAGER,
    "--[no-]jit-monitor-verbose": _EAGER,
    "--distributed-executor-backend": "ranks are always processes (torch.distributed with --dist-init across machines)",
    "--[no-]disable-custom-all-reduce": "the all-reduce is ours: shared memory on a CPU, NCCL on CUDA",
    "--max-parallel-loading-workers": _LOADING,
    "--safetensors-load-strategy": _LOADING,
    "--safetensors-prefetch-num-threads": _LOADING,
    "--safetensors-prefetch-block-size": _LOADING,
    "--model-loader-extra-config": _LOADING,
    "--pt-load-map-location": _LOADING,
    "--ignore-patterns": "only the config, tokenizer and the safetensors shards the index names are downloaded",
    "--[no-]use-tqdm-on-load": "progress bars are shown when stderr is a terminal",
    "--structured-outputs-config": _LLGUIDANCE,
    "--guided-decoding-backend": _LLGUIDANCE,
    "--[no-]disable-frontend-multiprocessing": "the HTTP server and the engine share one process; ranks are processes",
    "--api-server-count|-asc": "one API server process per replica",
    "--tokenizer-mode": ("the tokenizer is the model's own (tokenizer.json, or the GGUF's)", "auto", "hf"),
    "--code-revision": "no model code is ever run",
    "--speculative-config|-sc": _SPEC,
    "--spec-method": _SPEC,
    "--spec-model": _SPEC,
    "--spec-tokens": _SPEC,
    "--[no-]enable-tokenizer-info-endpoint": ("GET /tokenizer_info is always served", "true"),
    "--[no-]exclude-tools-when-tool-choice-none": ("tools are left out of the prompt when tool_choice is none", "true"),
    "--[no-]disable-sliding-window": ("the context is capped at the model's sliding window already", "true"),
    "--[no-]language-model-only": ("only language models are served", "true"),
    "--tool-strict-level": "function-call arguments are checked against the tool's JSON schema",
    "--sse-keep-alive-interval": "streams send each token as it is sampled, with no keep-alive events",
    "--h11-max-incomplete-event-size": "--max-request-bytes bounds a request body",
    "--h11-max-header-count": "request heads are bounded by --request-head-timeout",
    "--[no-]enable-offline-docs": "/docs is served from FastAPI's bundled assets",
    "--fingerprint-mode": "responses carry no system_fingerprint",
    "--fingerprint-value": "responses carry no system_fingerprint",
    "--cohere-format": _ENDPOINTS,
    "--[no-]cohere-is-reasoning-model": _ENDPOINTS,
    "--anthropic-disabled-thinking-effort": _ENDPOINTS,
    "--[no-]enable-scale-out": _DP,
    "--grpc-port": _ENDPOINTS,
    "--data-parallel-supervisor-port": _DP,
    "--dp-supervisor-probe-interval-s": _DP,
    "--dp-supervisor-probe-timeout-s": _DP,
    "--dp-supervisor-probe-failure-threshold": _DP,
    "--data-parallel-rank|-dpn": _DP,
    "--data-parallel-start-rank|-dpr": _DP,
    "--data-parallel-size-local|-dpl": _DP,
    "--data-parallel-address|-dpa": _DP,
    "--data-parallel-rpc-port|-dpp": _DP,
    "--data-parallel-backend|-dpb": _DP,
    "--[no-]data-parallel-hybrid-lb|-dph": _DP,
    "--[no-]data-parallel-external-lb|-dpe": _DP,
    "--[no-]data-parallel-multi-port-external-lb|-dpm": _DP,
    "--dp-sync-interval": _DP,
    "--[no-]disable-nccl-for-dp-synchronization": _DP,
    "--[no-]enable-elastic-ep": _MOE,
    "--elastic-ep-max-dp-size": _MOE,
    "--[no-]enable-expert-parallel|-ep": _MOE,
    "--[no-]enable-ep-weight-filter": _MOE,
    "--all2all-backend": _MOE,
    "--[no-]enable-eplb": _MOE,
    "--eplb-config": _MOE,
    "--expert-placement-strategy": _MOE,
    "--moe-backend": _MOE,
    "--[no-]enable-return-routed-experts": _MOE,
    "--[no-]enable-dbo": _GPU,
    "--dbo-decode-token-threshold": _GPU,
    "--dbo-prefill-token-threshold": _GPU,
    "--ubatch-size": _GPU,
    "--[no-]enable-hc-sp": _GPU,
    "--[no-]enable-batch-sharded-sampling": "rank 0 samples every sequence of a step",
    "--[no-]enable-shm-tensor-arena": "each rank's weights are one arena already",
    "--master-addr": _MULTINODE,
    "--master-port": _MULTINODE,
    "--distributed-timeout-seconds": "a step slower than --step-timeout counts as a hung rank",
    "--cpu-distributed-timeout-seconds": "a step slower than --step-timeout counts as a hung rank",
    "--[no-]numa-bind": "each rank's threads follow the operating system's placement",
    "--numa-bind-nodes": "each rank's threads follow the operating system's placement",
    "--numa-bind-cpus": "each rank's threads follow the operating system's placement",
    "--device-ids": "--device cuda:N picks the device; rank r takes GPU r by default",
    "--dcp-comm-backend": "no context parallelism",
    "--[no-]dcp-q-replicate": "no context parallelism",
    "--dcp-kv-cache-interleave-size": "no context parallelism",
    "--cp-kv-cache-interleave-size": "no context parallelism",
    "--[no-]ray-workers-use-nsight": "ranks are processes, never Ray workers",
    "--[no-]enable-fault-tolerance": "a failed rank restarts the pool (--pool-max-restarts)",
    "--fault-tolerance-config": "a failed rank restarts the pool (--pool-max-restarts)",
    "--[no-]enable-sleep-mode": _GPU,
    "--[no-]sleep-mode-offload-cudagraph": _GPU,
    "--sleep-preserve-parameter-names": _GPU,
    "--[no-]enable-cumem-allocator": _GPU,
    "--[no-]enable-nccl-comm-suspend": _GPU,
    "--[no-]disable-cascade-attn": _KERNELS,
    "--attention-backend": _KERNELS,
    "--attention-config|-ac": _KERNELS,
    "--kernel-config": _KERNELS,
    "--ir-op-priority": _KERNELS,
    "--[no-]enable-flashinfer-autotune": _KERNELS,
    "--linear-backend": _KERNELS,
    "--sparse-indexer-topk-backend": _KERNELS,
    "--gdn-prefill-backend": _KERNELS,
    "--kda-prefill-backend": _KERNELS,
    "--kda-decode-backend": _KERNELS,
    "--performance-mode": _KERNELS,
    "--additional-config": _KERNELS,
    "--mamba-backend": _MAMBA,
    "--mamba-ssu-algorithm": _MAMBA,
    "--[no-]enable-mamba-cache-stochastic-rounding": _MAMBA,
    "--mamba-cache-philox-rounds": _MAMBA,
    "--mamba-cache-dtype": _MAMBA,
    "--mamba-ssm-cache-dtype": _MAMBA,
    "--mamba-block-size": _MAMBA,
    "--mamba-cache-mode": _MAMBA,
    "--[no-]enable-mamba-shared-prefix-checkpoint": _MAMBA,
    "--replayssm-buffer-len": _MAMBA,
    "--[no-]use-replayssm": _MAMBA,
    "--[no-]swa-bounded-replay": _KV,
    "--[no-]use-fp64-gumbel": "sampling draws come from each request's seeded generator",
    "--[no-]enable-trace-replay": _METRICS,
    "--[no-]allow-deprecated-quantization": "pre-quantized checkpoints are not loaded",
    "--renderer-num-workers": "chat templates render in the request's own handler",
    "--limit-mm-per-prompt": _TEXT_ONLY,
    "--[no-]enable-mm-embeds": _TEXT_ONLY,
    "--media-io-kwargs": _TEXT_ONLY,
    "--mm-processor-kwargs": _TEXT_ONLY,
    "--mm-processor-cache-gb": _TEXT_ONLY,
    "--mm-processor-cache-type": _TEXT_ONLY,
    "--mm-hasher-algorithm": _TEXT_ONLY,
    "--mm-shm-cache-max-object-size-mb": _TEXT_ONLY,
    "--[no-]mm-encoder-only": _TEXT_ONLY,
    "--mm-encoder-tp-mode": _TEXT_ONLY,
    "--mm-encoder-attn-backend": _TEXT_ONLY,
    "--mm-encoder-attn-dtype": _TEXT_ONLY,
    "--mm-encoder-fp8-scale-path": _TEXT_ONLY,
    "--mm-encoder-fp8-scale-save-path": _TEXT_ONLY,
    "--mm-encoder-fp8-scale-save-margin": _TEXT_ONLY,
    "--[no-]interleave-mm-strings": _TEXT_ONLY,
    "--[no-]skip-mm-profiling": _TEXT_ONLY,
    "--video-pruning-rate": _TEXT_ONLY,
    "--video-pruning-method": _TEXT_ONLY,
    "--mm-tensor-ipc": _TEXT_ONLY,
    "--mm-processor-device": _TEXT_ONLY,
    "--mm-ipc-gpu-memory-gb": _TEXT_ONLY,
    "--[no-]mm-device-do-normalize": _TEXT_ONLY,
    "--[no-]trust-request-mm-kwargs": _TEXT_ONLY,
    "--allowed-local-media-path": _TEXT_ONLY,
    "--allowed-media-domains": _TEXT_ONLY,
    "--ec-manager-config": _TEXT_ONLY,
    "--max-loras": _LORA,
    "--max-lora-rank": _LORA,
    "--lora-dtype": _LORA,
    "--[no-]enable-tower-connector-lora": _LORA,
    "--max-cpu-loras": _LORA,
    "--[no-]fully-sharded-loras": _LORA,
    "--lora-target-modules": _LORA,
    "--default-mm-loras": _LORA,
    "--[no-]specialize-active-lora": _LORA,
    "--[no-]enable-mixed-moe-lora-format": _LORA,
    "--[no-]enable-moe-shared-loras": _LORA,
    "--max-lora-cls-labels": _LORA,
    "--[no-]enable-flash-late-interaction": _GENERATE,
    "--engram-config": _KERNELS,
    "--aux-output-config": "responses carry the OpenAI fields (and vLLM's prompt_logprobs)",
    "--weight-transfer-config": "weights load once per rank from the model's files",
    "--[no-]fail-on-environ-validation": "settings are validated at start-up: a bad one stops it",
    # flags of older vLLM releases, still in command lines people copy
    "--preemption-mode": "preempted sequences are recomputed, never swapped out",
    "--[no-]calculate-kv-scales": "the KV cache dtype follows --dtype (no fp8 scales)",
    "--[no-]expand-tools-even-if-tool-choice-none": "tools are left out of the prompt when tool_choice is none",
    "--tokenizer-pool-size": "requests are tokenized in their own handlers",
    "--[no-]disable-mm-preprocessor-cache": _TEXT_ONLY,
    "--cuda-graph-sizes": _EAGER,
    "--num-scheduler-steps": _SCHED,
    "--scheduler-delay-factor": _SCHED,
    "--num-lookahead-slots": _SPEC,
    "--speculative-model": _SPEC,
    "--num-speculative-tokens": _SPEC,
    "--[no-]use-v2-block-manager": _KV,
    "--[no-]disable-async-output-proc": _SCHED,
    "--[no-]multi-step-stream-outputs": "each token is streamed as soon as it is sampled",
}  # fmt: skip

# these would change results or promise what we do not do
REFUSED: dict[str, str | tuple[str, ...]] = {
    "--pipeline-parallel-size|-pp": ("pipeline parallelism is not implemented; use --tp (ranks on several machines: --dist-init)", "1"),
    "--decode-context-parallel-size|-dcp": ("context parallelism is not implemented; use --tp", "1"),
    "--prefill-context-parallel-size|-pcp": ("context parallelism is not implemented; use --tp", "1"),
    "--data-parallel-size|-dp": ("run more replicas behind a load balancer (deploy/k8s) instead", "1"),
    "--nnodes|-n": (_MULTINODE, "1"),
    "--node-rank|-r": (_MULTINODE, "0"),
    "--quantization|-q": ("pre-quantized checkpoints (AWQ, GPTQ, FP8, ...) are not loaded; --dtype int8 quantizes any checkpoint to weight-only INT8", "gguf"),
    "--quantization-config": "pre-quantized checkpoints are not loaded; --dtype int8 quantizes any checkpoint",
    "--kv-cache-dtype": ("the KV cache dtype follows --dtype (fp32, or fp16 under the C++ kernels)", "auto"),
    "--tokenizer": ("the tokenizer is always the model's own (tokenizer.json beside the weights, or the GGUF's)", "{model}"),
    "--tokenizer-revision": ("the tokenizer is always the model's own, at --revision", "{revision}"),
    "--load-format": ("weights load from safetensors or GGUF files", "auto", "safetensors", "gguf"),
    "--hf-overrides": "the model's config.json is served as it is; edit a copy to change it",
    "--hf-config-path": "the config is the model's own config.json (or the GGUF's metadata)",
    "--config-format": ("the config is the model's own config.json (or the GGUF's metadata)", "auto", "hf"),
    "--model-impl": ("the architectures are our own implementations", "auto"),
    "--model-class-overrides": "the architectures are our own implementations",
    "--[no-]enable-lora": (_LORA, "false"),
    "--lora-modules": _LORA,
    "--reasoning-parser": _REASONING,
    "--reasoning-parser-plugin": (_REASONING, ""),
    "--reasoning-config": _REASONING,
    "--ssl-keyfile": _TLS,
    "--ssl-certfile": _TLS,
    "--ssl-ca-certs": _TLS,
    "--ssl-cert-reqs": (_TLS, "0"),
    "--ssl-ciphers": _TLS,
    "--[no-]enable-ssl-refresh": (_TLS, "false"),
    "--task": (_GENERATE, "auto", "generate"),
    "--runner": (_GENERATE, "auto", "generate"),
    "--convert": (_GENERATE, "auto", "none"),
    "--pooler-config": _GENERATE,
    "--diffusion-config|-dc": _GENERATE,
    "--io-processor-plugin": _CODE,
    "--middleware": _CODE,
    "--logits-processors": _CODE,
    "--tool-parser-plugin": (_CODE, ""),
    "--worker-cls": (_CODE, "auto"),
    "--worker-extension-cls": (_CODE, ""),
    "--scheduler-cls": _CODE,
    "--tool-server": "tools are the client's: tool calls are returned, never run by the server",
    "--scheduling-policy": ("requests are served first come, first served; no priorities", "fcfs"),
    "--chat-template-content-format": ("message content is passed as the template expects it, detected from the template", "auto"),
    "--[no-]trust-request-chat-template": ("a request's own chat_template is never run", "false"),
    "--[no-]skip-tokenizer-init": ("prompts and outputs are always text through the model's tokenizer", "false"),
    "--[no-]tokens-only": ("prompts and outputs are always text through the model's tokenizer", "false"),
    "--[no-]enable-prompt-embeds": ("prompts are text or token ids, never embeddings", "false"),
    "--[no-]return-sampling-mask": ("responses carry no sampling masks", "false"),
    "--[no-]headless": ("the server always serves HTTP; ranks without it: `shardserve rank`", "false"),
    "--[no-]grpc": ("only HTTP is served", "false"),
    "--kv-transfer-config": _TRANSFER,
    "--kv-events-config": "no KV cache events are published",
    "--ec-transfer-config": _TRANSFER,
    "--watermark-config": "outputs are never watermarked",
    # older vLLM releases
    "--rope-scaling": "rotary scaling is the model's own (config.json or the GGUF's metadata)",
    "--rope-theta": "rotary scaling is the model's own (config.json or the GGUF's metadata)",
    "--override-pooler-config": _GENERATE,
    "--[no-]enable-reasoning": (_REASONING, "false"),
}  # fmt: skip

FOREIGN_FLAGS = (*_table(IGNORED, refuse=False), *_table(REFUSED, refuse=True))


def add_foreign_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "vLLM flags", "accepted for a vLLM command line: ignored with a warning, or refused when honouring "
        "them is impossible and ignoring them would change results",
    )  # fmt: skip
    for flag in FOREIGN_FLAGS:
        kind = "refused" if flag.refuse else "ignored"
        how = {"metavar": "VALUE"} if not flag.switch else {"action": argparse.BooleanOptionalAction}
        group.add_argument(
            *flag.names, dest=flag.dest, default=argparse.SUPPRESS, help=f"{kind}: {flag.why}", **how
        )


def check_foreign_flags(ns: argparse.Namespace, model: str | None, revision: str | None) -> list[str]:
    """One warning line per ignored flag given; ValueError naming the first refused one."""
    warnings = []
    for flag in FOREIGN_FLAGS:
        value = vars(ns).get(flag.dest)
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        ours = {v.format(model=model, revision=revision or "main") for v in flag.same_as_ours}
        if value in ours:
            continue
        if flag.refuse:
            raise ValueError(f"{flag.names[0]} {value} is not supported: {flag.why}")
        warnings.append(f"{flag.names[0]} is ignored: {flag.why}")
    return warnings
