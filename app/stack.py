"""The wiring: one serving stack from Settings (model file, tokenizer, worker pool, engine), and
the served-model card HTTP gets instead of any of it.

Built by the CLI for `serve` (as the API's Loader), `generate` and `bench engine`, so all three run
the same code path. Nothing here is imported by app/api: HTTP sees only the engine client and the
card (app/api/card.py)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.api.card import Loader, ServedModel
from app.device import Device
from app.engine.engine import Engine, EngineHooks
from app.engine.grammar import GrammarCompiler
from app.engine.scheduler import SchedulerConfig
from app.engine.types import Health, RequestOutput, StepStats
from app.kernels import resolve as resolve_kernels
from app.metrics import Metrics
from app.model.config import ModelConfig
from app.model.errors import reading_model
from app.model.generation_config import sampling_defaults
from app.model.hub import HubModelError, HubOptions
from app.model.loader import read_config
from app.model.memory import KV_BYTES, kv_blocks_for_budget, kv_cache_dtype
from app.model.store import BUILTIN_MODELS, builtin_entry, ensure_model, is_cached, resolve_model
from app.settings import Settings
from app.tokenizer.detokenizer import IncrementalDetokenizer
from app.tokenizer.tokenizer import Tokenizer, TokenizerError
from app.worker.pool import WorkerPool

log = logging.getLogger("shardserve")


@dataclass(frozen=True)
class Stack:
    """The loaded model and the parts that serve it; start() spawns the ranks and the engine."""

    settings: Settings
    model_path: Path
    model_name: str
    config: ModelConfig
    tokenizer: Tokenizer
    dtype: str
    max_model_len: int
    num_blocks: int
    pool: WorkerPool
    engine: Engine
    grammars: GrammarCompiler

    @property
    def compute(self) -> str:
        """The compute path the ranks run (`--kernels`), as rank 0 reported it once loaded."""
        return self.pool.ready[0].compute if self.pool.ready else "not loaded"

    @property
    def card(self) -> ServedModel:
        return ServedModel(
            name=self.model_name,
            architecture=self.config.architecture,
            dtype=self.dtype,
            tp=self.settings.tp,
            max_model_len=self.max_model_len,
            vocab_size=min(self.tokenizer.vocab_size, self.config.vocab_size),  # ids must embed and decode
            tokenizer=self.tokenizer,
            grammars=self.grammars,
            compute=self.compute,
            health=self.health,
            aliases=self.settings.served_names[1:],
        )

    def health(self) -> Health:
        if self.engine.failed is not None:
            return Health(
                "failed",
                f"The model's worker ranks failed ({self.engine.failed}) and {self.pool.restarts} "
                "restart(s) did not bring them back; the server must be restarted.",
            )
        if not self.pool.up or self.pool.check_alive() is not None:
            return Health("restarting")
        return Health("up")

    def start(self) -> None:
        ranks = self.pool.start()
        for r in ranks:
            log.info(
                "rank %d: weight arena %.1f MiB, KV cache %.1f MiB (%s resident), loaded in %.2fs, peak RSS %.0f MiB",
                r.rank, r.weight_bytes / 2**20, r.kv_cache_bytes / 2**20, _mib(r.kv_cache_resident_bytes),
                r.load_seconds, r.peak_rss_bytes / 2**20,
            )  # fmt: skip
        reserved = sum(r.kv_cache_bytes for r in ranks)
        resident = [r.kv_cache_resident_bytes for r in ranks]
        log.info(
            "model %s (%s, tp %d): KV cache %d blocks x %d tokens = %d tokens, context %d; %.1f MiB reserved, "
            "%s resident (pages take memory as they are first written)",
            self.model_name, self.dtype, self.settings.tp, self.num_blocks, self.settings.block_size,
            self.num_blocks * self.settings.block_size, self.max_model_len, reserved / 2**20,
            _mib(None if None in resident else sum(resident)),  # type: ignore[arg-type]
        )  # fmt: skip
        self.engine.start()

    def shutdown(self) -> None:
        self.engine.stop()
        self.pool.shutdown()


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:.1f} MiB"


def _max_model_len(settings: Settings, config: ModelConfig) -> int:
    # context_limit also caps a sliding-window model at its window: attending past it is wrong
    limit, why = config.context_limit()
    if settings.max_model_len is not None:
        if settings.max_model_len > limit:
            raise ValueError(f"--max-model-len {settings.max_model_len} exceeds {why}")
        return settings.max_model_len
    if limit < config.max_position_embeddings:
        log.info("context limited to %d tokens by %s", limit, why)
    return limit


def weight_dtype(settings: Settings, device: Device) -> str:
    """--dtype as served: `auto` is the fastest dtype measured for the device."""
    return device.auto_weight_dtype if settings.dtype == "auto" else settings.dtype


def kv_dtype_for(settings: Settings, device: Device) -> str:
    """The KV cache dtype the ranks will allocate (app/model/memory.kv_cache_dtype)."""
    kernels = device.kind == "cpu" and resolve_kernels(settings.kernels) != "torch"
    return kv_cache_dtype(weight_dtype(settings, device), kernels)


def _num_blocks(settings: Settings, config: ModelConfig, max_model_len: int, device: Device) -> int:
    """KV blocks for the ranks; at least one sequence of the full context must fit, else a request the
    API accepted could never be scheduled (it used to end at once, 200 with `length` and no text)."""
    bs = settings.block_size
    if settings.kv_cache_tokens is not None:
        kv = settings.kv_cache_tokens
        if kv < max_model_len:
            limit = (
                f"--max-model-len {max_model_len}"
                if settings.max_model_len is not None
                else config.context_limit()[1]
            )
            raise ValueError(
                f"--kv-cache-tokens {kv} is smaller than the context of {max_model_len} tokens ({limit}): "
                f"one sequence of full length would not fit in the KV cache. Raise --kv-cache-tokens to "
                f"{max_model_len} or more, or lower --max-model-len to {kv} or less"
            )
        return -(-kv // bs)
    if settings.kv_cache_memory_bytes is not None:  # vLLM's --kv-cache-memory-bytes: free memory is not read
        budget, size_flag = settings.kv_cache_memory_bytes, "--kv-cache-memory-bytes"
    else:
        budget = int(device.free_memory_bytes() * settings.kv_cache_memory_fraction)
        size_flag = "--kv-cache-memory-fraction"
    fits = kv_blocks_for_budget(
        config, settings.tp, bs, budget, KV_BYTES[kv_dtype_for(settings, device)],
        per_rank=settings.kv_cache_memory_bytes is not None,
    )  # fmt: skip
    useful = settings.max_num_seqs * -(-max_model_len // bs)  # more than every seat at full context is waste
    blocks = min(fits, useful)
    if blocks * bs < max_model_len:
        raise ValueError(
            f"the KV cache fits only {blocks * bs} tokens in {budget / 2**20:.0f} MiB, less than one "
            f"sequence of {max_model_len}; lower --max-model-len, or raise {size_flag} or --kv-cache-tokens"
        )
    return blocks


def serving_limits(settings: Settings, config: ModelConfig, device: Device) -> tuple[int, int]:
    """(context length, KV blocks) as served; ValueError when the settings cannot work together."""
    max_model_len = _max_model_len(settings, config)
    return max_model_len, _num_blocks(settings, config, max_model_len, device)


def check_before_load(settings: Settings) -> None:
    """What `serve` can refuse before it spawns anything: the model's metadata (a GGUF header, a
    config.json) and the limits derived from it. A built-in model not yet downloaded is checked
    only after the download, by build_stack, and so is a hub id not yet in the cache."""
    name = settings.model.strip().lower()
    if name in BUILTIN_MODELS and not is_cached(name, settings.home):
        return
    try:
        model_path = resolve_model(settings.model, settings.home, HubOptions.of(settings))
    except HubModelError:
        return  # a hub id not cached yet: fetched, then checked, by build_stack
    serving_limits(settings, read_config(model_path), Device.resolve(settings.device))


def read_model(settings: Settings) -> tuple[Path, ModelConfig, Tokenizer]:
    """The model's file (downloaded if it is a built-in name or hub id not yet cached), config and tokenizer;
    every failure is one ModelLoadError or TokenizerError naming the file."""
    progress = sys.stderr.isatty()  # bars only for a person watching, never into a log file
    model_path = ensure_model(
        settings.model, settings.home, progress=progress, hub=HubOptions.of(settings, progress)
    )
    config = read_config(model_path)
    with reading_model(model_path, TokenizerError):  # a corrupt tokenizer surfaces in the tokenizers library
        tokenizer = Tokenizer.load(model_path, chat_template=settings.chat_template)
    entry = builtin_entry(settings.model, model_path)
    defaults, source = sampling_defaults(
        settings.generation_config, settings.override_generation_config, model_path,
        entry.generation_defaults if entry else None,
    )  # fmt: skip
    tokenizer.generation_defaults = defaults  # what the request side reads
    if defaults:
        log.info("sampling defaults where a request is silent (from %s): %s", source,
                 ", ".join(f"{k}={v}" for k, v in defaults.items()))  # fmt: skip
    return model_path, config, tokenizer


def build_stack(
    settings: Settings,
    on_outputs: Callable[[list[RequestOutput]], None],
    on_step: Callable[[StepStats], None] = lambda s: None,
    metrics: Metrics | None = None,
) -> Stack:
    """The stack, not started. With `metrics`, every output and step is observed before delivery,
    the engine's queue and KV gauges are read at scrape time and the pool reports its ranks."""
    if metrics is not None:
        deliver, step_hook = on_outputs, on_step

        def on_outputs(outs: list[RequestOutput]) -> None:
            metrics.observe_outputs(outs)
            deliver(outs)

        def on_step(stats: StepStats) -> None:
            metrics.observe_step(stats)
            step_hook(stats)

    model_path, config, tokenizer = read_model(settings)
    device = Device.resolve(settings.device)
    dtype = weight_dtype(settings, device)
    max_model_len, num_blocks = serving_limits(settings, config, device)
    pool = WorkerPool(settings, model_path, dtype, num_blocks, metrics=metrics)
    sched = SchedulerConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=max(settings.max_num_batched_tokens, settings.max_num_seqs),
        max_model_len=max_model_len,
        block_size=settings.block_size,
    )
    name = settings.served_name
    grammars = GrammarCompiler(tokenizer.backend_json(), tokenizer.vocab_size, tokenizer.eos_token_ids)
    engine = Engine(
        executor=pool,
        config=sched,
        num_blocks=num_blocks,
        tokenizer=tokenizer,
        detokenizer_factory=IncrementalDetokenizer,
        hooks=EngineHooks(on_outputs=on_outputs, on_step=on_step),
        enable_prefix_caching=settings.enable_prefix_caching,
        grammars=grammars,
    )
    if metrics is not None:
        metrics.bind_engine(engine.stats)
        metrics.model_info.info(
            {"model": name, "architecture": config.architecture, "dtype": dtype, "tp": str(settings.tp),
             "max_model_len": str(max_model_len)}
        )  # fmt: skip
    return Stack(
        settings,
        model_path,
        name,
        config,
        tokenizer,
        dtype,
        max_model_len,
        num_blocks,
        pool,
        engine,
        grammars,
    )


def loader(settings: Settings) -> Loader:
    """The API's Loader for these settings (app/api/card.py): build the stack, start it."""

    def load(metrics: Metrics, deliver: Callable[[list[RequestOutput]], None]) -> Stack:
        stack = build_stack(settings, deliver, metrics=metrics)
        stack.start()
        return stack

    return load
