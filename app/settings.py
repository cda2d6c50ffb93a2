"""The one settings object: every option is a CLI flag and a SHARDSERVE_<NAME> variable.

Built once at start-up (CLI values override the environment, which overrides the defaults) and
passed down; nothing reads the environment anywhere else, except huggingface_hub, which reads its
own HF_* variables (HF_TOKEN, HF_HUB_CACHE, HF_HUB_OFFLINE) as it does for every program using it."""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Dtype = Literal["auto", "fp32", "bf16", "fp16", "int8"]
# vLLM's --logprobs-mode: what logprobs report, the model's own distribution (raw) or the one sampled
# from after penalties, bias, temperature, top-k/top-p/min-p (processed); as log-probabilities or logits
LogprobsMode = Literal["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"]
# vLLM's spellings of the same dtypes (its `auto` is the checkpoint's dtype; ours the fastest here)
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}

DEFAULT_MODEL = "smollm2-135m-instruct"
# generation_config.json's sampling keys -> the request parameter each sets where a request is silent
# (vLLM's get_diff_sampling_param); app/model/generation_config.py reads them
GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


_HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kmgtKMGT])")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_int(v: object) -> object:
    """vLLM's human-readable integers: "1k" = 1000, "1K" = 1024, "25.6k" = 25600, "2M" = 2 * 2**20.

    A lower-case suffix is decimal and takes a fraction; an upper-case one binary, whole numbers only
    (as vLLM's human_readable_int). Anything else goes on to pydantic's own int parsing."""
    if not isinstance(v, str):
        return v
    m = _HUMAN_INT.fullmatch(v.strip())
    if m is None:
        return v.strip()
    number, suffix = m.groups()
    if suffix in _DECIMAL:  # Decimal, not float: 4.1k is 4100, never 4099
        return int(Decimal(number) * _DECIMAL[suffix])
    if "." in number:
        raise ValueError(f"no fraction with a binary suffix: {v!r} (did you mean {number}{suffix.lower()}?)")
    return int(number) * _BINARY[suffix]


def human_int_or_auto(v: object) -> object:
    """human_int, and vLLM's "auto" or -1 for "the model's own" (None)."""
    if v == -1 or (isinstance(v, str) and v.strip().lower() in ("auto", "-1")):
        return None
    return human_int(v)


def _json_or_plain_list(v: object) -> object:
    """A list setting's values as vLLM takes them: `--allowed-origins '["*"]'` (a JSON list) as well
    as plain values, repeated or several after one flag; the environment's one string is a JSON list
    or comma-separated."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        return v
    out: list[object] = []
    for item in items:
        if isinstance(item, str) and item.strip().startswith("["):
            try:
                parsed = json.loads(item)
            except ValueError as e:
                raise ValueError(f"not a JSON list: {item!r} ({e})") from None
            if not isinstance(parsed, list):
                raise ValueError(f"not a JSON list: {item!r}")
            out += parsed
        elif isinstance(item, str) and isinstance(v, str):
            out += [s.strip() for s in item.split(",") if s.strip()]
        else:
            out.append(item)
    return out


# a list of strings from flags (`--x A B`, `--x A --x B`, `--x '["A", "B"]'`) or the environment
JsonOrPlainList = Annotated[list[str], NoDecode, BeforeValidator(_json_or_plain_list)]


def default_home() -> Path:
    return Path(os.path.expanduser("~/.cache/shardserve"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHARDSERVE_", extra="ignore", protected_namespaces=())

    home: Path = Field(default_factory=default_home, description="model cache directory")
    model: str = Field(
        DEFAULT_MODEL,
        description="built-in name, .gguf file, Hugging Face directory or hub id (org/name)",
    )
    revision: str | None = Field(None, description="hub model: branch, tag or commit (default main)")
    hf_token: str | None = Field(
        None, description="hub model: access token (default: HF_TOKEN or the saved `hf auth login`)"
    )
    download_dir: Path | None = Field(
        None, description="hub model: cache directory (default: HF_HUB_CACHE, ~/.cache/huggingface/hub)"
    )
    served_model_name: JsonOrPlainList = Field(
        default_factory=list,
        description="model id(s) in the API: a request may name any of them, /v1/models lists them all, "
        "the first is what responses, metrics and /version report (default: the model's name)",
    )
    dtype: Dtype = Field(
        "auto",
        description="weight dtype (also vLLM's bfloat16, float16, half, float32, float); auto = fastest "
        "measured here (int8 weight-only on a CPU)",
    )
    tp: int = Field(1, ge=1, le=64, description="tensor-parallel ranks (processes)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    max_num_seqs: int = Field(64, ge=1, le=4096, description="sequences computed together in one step")
    max_num_batched_tokens: int = Field(512, ge=16, description="tokens per step (prefill chunks + decodes)")
    kv_cache_tokens: int | None = Field(
        None, ge=16, description="KV cache size in tokens (default: sized from memory)"
    )
    kv_cache_memory_fraction: float = Field(
        0.25, gt=0, le=0.95, description="share of free memory for the KV cache"
    )
    kv_cache_memory_bytes: Annotated[int | None, BeforeValidator(human_int)] = Field(
        None,
        ge=1,
        description="KV cache size in bytes per rank, as vLLM's per GPU (1G = 2**30, 1g = 10**9); "
        "overrides --kv-cache-memory-fraction, and --kv-cache-tokens overrides both",
    )
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV block")
    enable_prefix_caching: bool = Field(True, description="share KV blocks of identical prompt prefixes")
    max_model_len: Annotated[int | None, BeforeValidator(human_int_or_auto)] = Field(
        None,
        ge=16,
        description="context limit: 4096, 1k (1000), 1K (1024), 25.6k; auto or -1 = the model's (the default)",
    )
    max_queued_requests: int = Field(256, ge=1, description="waiting requests before 429")
    max_queued_tokens: int = Field(1_000_000, ge=1, description="waiting prompt tokens before 429")
    max_request_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    request_head_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a connection has to send a request's line and headers, else 408 and "
        "closed (default 10)",
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="open connections at most; beyond it those without a request are closed first, then "
        "newcomers get 503 (default: what the open-file limit allows, at least 1000; the soft limit is "
        "raised to the hard one at start-up)",
    )
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list, description="accepted API keys")
    api_key_file: Path | None = Field(None, description="file with one API key per line")
    allowed_origins: JsonOrPlainList = Field(
        default_factory=list, description="CORS origins, e.g. '[\"*\"]' (none: no CORS headers at all)"
    )
    allow_credentials: bool = Field(False, description="CORS: allow credentials (cookies, Authorization)")
    allowed_methods: JsonOrPlainList = Field(
        default_factory=lambda: ["*"], description="CORS methods (default: any)"
    )
    allowed_headers: JsonOrPlainList = Field(
        default_factory=lambda: ["*"], description="CORS request headers (default: any)"
    )
    enable_request_id_headers: bool = Field(
        True,
        description="answer with X-Request-Id: the client's own if it sent a tame one, else the id made "
        "for the request (on by default here, unlike vLLM)",
    )
    root_path: str = Field(
        "", description="path prefix a proxy strips before forwarding (the API docs link through it)"
    )
    disable_fastapi_docs: bool = Field(False, description="no /docs, /redoc and /openapi.json")
    uds: str | None = Field(None, description="listen on this Unix domain socket instead of --host/--port")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds in-flight requests get on SIGTERM")
    step_timeout: float = Field(60.0, gt=0, description="a step slower than this counts as a hung rank")
    pool_max_restarts: int = Field(
        3, ge=0, description="restarts of the worker ranks per failure episode before /health fails"
    )
    rank_death_timeout: float = Field(2.0, gt=0, description="seconds to notice a dead rank")
    request_timeout: float | None = Field(None, gt=0, description="server maximum per-request deadline (s)")
    local_ranks: int | None = Field(
        None,
        ge=1,
        description="ranks this process starts (default: all); the rest join with `shardserve rank`",
    )
    dist_init: str | None = Field(
        None, description="rendezvous address tcp://HOST:PORT for ranks on other machines"
    )
    chat_template: str | None = Field(None, description="chat template file overriding the model's")
    tool_call_parser: Literal["hermes"] = Field(
        "hermes", description="how the model writes tool calls (read back into tool_calls)"
    )
    seed: int = Field(0, description="seed of unseeded sampling")
    generation_config: str = Field(
        "auto",
        description="sampling defaults where a request is silent, as vLLM's: auto = the model's "
        "generation_config.json (the built-in model: its model card's), vllm = none (OpenAI's defaults), "
        "or a directory holding a generation_config.json",
    )
    override_generation_config: dict[str, float | int] = Field(
        default_factory=dict,
        description='JSON object over those defaults, e.g. \'{"temperature": 0.5, "max_new_tokens": 256}\'',
    )
    response_role: str = Field(
        "assistant",
        min_length=1,
        description="role of the reply in chat completions (a request with add_generation_prompt false "
        "gets its last message's role)",
    )
    max_logprobs: int = Field(
        20,
        ge=-1,
        description="largest logprobs / top_logprobs / prompt_logprobs a request may ask (-1: the "
        "vocabulary size)",
    )
    logprobs_mode: LogprobsMode = Field(
        "raw_logprobs",
        description="what logprobs report: the model's distribution (raw) or the one sampled from, after "
        "penalties, bias, temperature, top-k/top-p/min-p (processed); log-probabilities or logits "
        "(prompt_logprobs are always raw log-probabilities, as in vLLM)",
    )
    return_tokens_as_token_ids: bool = Field(
        False, description="logprobs name each token token_id:ID instead of its text (bytes stay the token's)"
    )
    enable_force_include_usage: bool = Field(
        False, description="streams end with a usage chunk even without stream_options.include_usage"
    )
    enable_prompt_tokens_details: bool = Field(
        False, description="usage has prompt_tokens_details.cached_tokens (prefix-cache hits)"
    )
    default_chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="JSON object of chat template variables under each request's chat_template_kwargs, "
        """e.g. '{"enable_thinking": false}' (the request's keys win)""",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = Field(False, description="log prompts and outputs (off: they never reach the logs)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="compute device")
    kernels: Literal["auto", "avx512vnni", "avx512", "avx2", "torch"] = Field(
        "auto",
        description="CPU compute path: our C++ kernels (auto = the best ISA build this CPU runs; "
        "avx512vnni takes int8 weights with int8 activations) or the torch reference path",
    )

    @property
    def served_name(self) -> str:
        """The model's id in responses and in every metric's model_name label: the first
        --served-model-name, else a built-in name or hub id as given (no path on disk), else the file
        or directory's stem."""
        return self.served_names[0]

    @property
    def served_names(self) -> tuple[str, ...]:
        """Every id a request may name, the reported one first (--served-model-name A B: A, B)."""
        if self.served_model_name:
            return tuple(self.served_model_name)
        spec = self.model.strip()
        if "/" not in spec or not Path(spec).expanduser().exists():
            return (spec,)
        return (Path(spec).expanduser().stem,)

    @field_validator("dtype", mode="before")
    @classmethod
    def _vllm_dtype(cls, v: object) -> object:
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("override_generation_config", "default_chat_template_kwargs", mode="before")
    @classmethod
    def _json_object(cls, v: object) -> object:
        if isinstance(v, str):  # a flag's value; the environment's is decoded by pydantic-settings
            try:
                v = json.loads(v)
            except ValueError as e:
                raise ValueError(f"not a JSON object: {e}") from None
            if not isinstance(v, dict):  # a list or a number would fail later with a vaguer message
                raise ValueError(f"not a JSON object: {json.dumps(v)[:60]}")
        return v

    @field_validator("override_generation_config")
    @classmethod
    def _known_generation_keys(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(GENERATION_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(GENERATION_KEYS)}")
        return v

    @field_validator("generation_config")
    @classmethod
    def _generation_config_exists(cls, v: str) -> str:
        if v not in ("auto", "vllm") and not (Path(v).expanduser() / "generation_config.json").is_file():
            raise ValueError(f"{v!r} is not auto, vllm or a directory holding a generation_config.json")
        return v

    @field_validator("root_path")
    @classmethod
    def _one_leading_slash(cls, v: str) -> str:
        # "llm", "/llm/" and "/llm" are one prefix; Starlette matches only "/llm" against a path
        # the proxy did not strip
        return "/" + v.strip().strip("/") if v.strip().strip("/") else ""

    @field_validator("served_model_name")
    @classmethod
    def _no_empty_name(cls, names: list[str]) -> list[str]:
        names = [n.strip() for n in names]
        if not all(names):
            raise ValueError("a served model name is empty or only whitespace")
        return list(dict.fromkeys(names))  # a name given twice is listed once

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        # the environment gives one string; its empty items are kept so that the check below sees them
        return v.split(",") if isinstance(v, str) else v

    @field_validator("api_key")
    @classmethod
    def _no_empty_key(cls, keys: list[str]) -> list[str]:
        # `--api-key "$UNSET_VAR"` must not switch authentication on with an empty key that an empty
        # bearer token matches, nor off: it is a mistake, said at start-up
        keys = [k.strip() for k in keys]
        if not all(keys):
            raise ValueError(
                "an API key is empty or only whitespace (an unset variable in a script?); give real "
                "keys, or no --api-key and no SHARDSERVE_API_KEY at all to serve without keys"
            )
        return keys

    @model_validator(mode="after")
    def _read_key_file(self) -> Settings:
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as e:
                raise ValueError(f"--api-key-file {self.api_key_file}: {e.strerror}") from None
            keys = [k.strip() for k in lines if k.strip()]  # blank lines separate keys, they are not keys
            if not keys:  # an empty mounted secret would otherwise serve without authentication
                raise ValueError(f"--api-key-file {self.api_key_file} holds no API key (only blank lines)")
            self.api_key = [*self.api_key, *keys]
        return self
