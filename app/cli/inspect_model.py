"""`shardserve inspect`: what a model costs before it is served, from its metadata alone.

Every number comes from app/model/costs.py (the code the server's start-up report uses); this
module only adds the machine's free memory, the verdicts and the rendering (rich tables, or JSON)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

from app.device import Device
from app.kernels import describe as describe_kernels
from app.kernels import resolve as resolve_kernels
from app.model.costs import PARTS, ModelCosts, SplitCost, model_costs
from app.model.hub import HubOptions
from app.model.memory import KV_BYTES, kv_cache_dtype
from app.model.store import resolve_model
from app.settings import Settings

DEFAULT_DTYPES = ("fp32", "bf16", "int8")  # fp16 takes exactly the bytes of bf16
RANK_RUNTIME_NOTE = (
    "each rank process also needs its own runtime (about 220 MiB RSS for Python + torch, measured)"
)
_CONFIG_KEYS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "attention_bias", "mlp_bias")  # fmt: skip


@dataclass(frozen=True)
class Fit:
    """One (TP size, dtype) against free memory: ranks on one host share it; GPUs are separate."""

    tp: int
    dtype: str
    need: dict[str, int]  # memory pool ("host", "cuda:0", ...) -> weights + KV of the ranks placed there
    weights: dict[str, int]  # the weights alone, same pools
    free: dict[str, int]
    fits: bool
    weights_fit: bool
    verdict: str


def free_memory(device: Device) -> dict[str, int]:
    """Free bytes of each pool a rank can be placed on."""
    if device.kind == "cuda":
        import torch

        return {f"cuda:{i}": Device("cuda", i).free_memory_bytes() for i in range(torch.cuda.device_count())}
    return {"host": device.free_memory_bytes()}


def _pool_of(rank: int, pools: list[str]) -> str:
    return pools[rank % len(pools)]  # the worker pool's placement: GPU rank mod count


def fit(split: SplitCost, dtype: str, free: dict[str, int], costs: ModelCosts) -> Fit:
    pools = list(free)
    need = dict.fromkeys(pools, 0)
    weights = dict.fromkeys(pools, 0)
    for r in split.ranks:
        pool = _pool_of(r.rank, pools)
        need[pool] += r.total_bytes(dtype)
        weights[pool] += r.weights[dtype].total
    fits = all(need[p] <= free[p] for p in pools)
    weights_fit = all(weights[p] <= free[p] for p in pools)
    worst = max(pools, key=lambda p: need[p] - free[p])
    ctx = f"{costs.max_num_seqs} x {costs.max_model_len} tokens of KV"
    if fits:
        verdict = f"fits: {human_bytes(need[worst])} of {human_bytes(free[worst])} free ({worst}), with {ctx}"
    elif weights_fit:
        per_token = sum(r.kv_bytes_per_token for r in split.ranks if _pool_of(r.rank, pools) == worst)
        tokens = (free[worst] - weights[worst]) // max(per_token, 1)
        verdict = (
            f"weights fit, KV does not: {ctx} needs {human_bytes(need[worst] - weights[worst])}, "
            f"about {tokens} tokens of KV fit beside the weights ({worst})"
        )
    else:
        worst = max(pools, key=lambda p: weights[p] - free[p])
        verdict = f"does not fit: the weights alone need {human_bytes(weights[worst])}, {human_bytes(free[worst])} free ({worst})"
    return Fit(split.tp, dtype, need, weights, free, fits, weights_fit, verdict)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def _dtypes(asked: list[str] | None, settings: Settings, device: Device) -> tuple[list[str], str]:
    served = device.auto_weight_dtype if settings.dtype == "auto" else settings.dtype
    out: list[str] = []
    for d in asked or [*DEFAULT_DTYPES, served]:
        d = served if d == "auto" else d
        if d not in out:
            out.append(d)
    return out, served


def inspect_command(settings: Settings, ns: argparse.Namespace) -> int:
    path = resolve_model(settings.model, settings.home, HubOptions.of(settings))
    device = Device.resolve(settings.device)
    dtypes, served = _dtypes(getattr(ns, "dtypes", None), settings, device)
    kernels_on = device.kind == "cpu" and resolve_kernels(settings.kernels) != "torch"
    compute = describe_kernels(settings.kernels) if device.kind == "cpu" else device.kind
    tp_sizes = list(dict.fromkeys(getattr(ns, "tp_sizes", None) or sorted({1, 2, settings.tp})))
    costs = model_costs(
        path,
        dtypes,
        tp_sizes,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        block_size=settings.block_size,
        device_kind=device.kind,
        kv_dtype=kv_cache_dtype(served, kernels_on),
    )
    free = free_memory(device)
    fits = [fit(s, d, free, costs) for s in costs.splits if s.possible for d in dtypes]
    if getattr(ns, "json", False):
        print(json.dumps({**to_json(costs, fits, free, device, served), "compute": compute}, indent=2))
    else:
        render(costs, fits, free, device, served)
        print(f"compute path: {compute}")
    return 0


def to_json(
    costs: ModelCosts, fits: list[Fit], free: dict[str, int], device: Device, served: str
) -> dict[str, Any]:
    cfg = costs.config
    splits = []
    for s in costs.splits:
        ranks = []
        for r in s.ranks:
            d = asdict(r)
            d["weight_bytes"] = d.pop("weights")
            ranks.append(d)
        splits.append(
            {
                "tp": s.tp,
                "possible": s.possible,
                "error": s.error,
                "ranks": ranks,
                "fit": {f.dtype: _fit_json(f) for f in fits if f.tp == s.tp},
            }
        )
    return {
        "model": str(costs.path),
        "format": costs.file_format,
        "architecture": {k: getattr(cfg, k) for k in _CONFIG_KEYS},
        "parameters": {**{p: costs.params[p] for p in PARTS}, "total": costs.total_params},
        "file_bytes": costs.file_bytes,
        "weight_bytes": costs.weight_bytes,
        "served_dtype": served,
        "kv_cache": {
            "dtype": costs.kv_dtype,
            "dtype_bytes": KV_BYTES[costs.kv_dtype],
            "bytes_per_token": costs.kv_bytes_per_token,
            "max_model_len": costs.max_model_len,
            "max_num_seqs": costs.max_num_seqs,
            "block_size": costs.block_size,
            "tokens": costs.kv_tokens,
        },
        "tp": splits,
        "memory": {"device": device.kind, "free_bytes": free, "not_counted": RANK_RUNTIME_NOTE},
    }


def _fit_json(f: Fit) -> dict[str, Any]:
    return {
        "fits": f.fits,
        "weights_fit": f.weights_fit,
        "need_bytes": f.need,
        "weight_bytes": f.weights,
        "free_bytes": f.free,
        "verdict": f.verdict,
    }


def _span(r: tuple[int, int]) -> str:
    if r[1] - r[0] == 1:
        return str(r[0])
    return f"{r[0]}-{r[1] - 1}" if r[1] > r[0] else "none"


def render(costs: ModelCosts, fits: list[Fit], free: dict[str, int], device: Device, served: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: rich would assume 80 columns and wrap every table
        console = Console(width=140)
    cfg = costs.config
    console.print(f"[bold]{costs.path}[/] ({costs.file_format}, {human_bytes(costs.file_bytes)} of tensors)")
    shape = Table(title="Architecture", show_header=False, title_justify="left")
    for key, value in (
        ("architecture", cfg.architecture),
        ("layers", cfg.num_layers),
        ("hidden / intermediate", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
        ("heads (query / KV) x dim", f"{cfg.num_heads} / {cfg.num_kv_heads} x {cfg.head_dim}"),
        ("vocabulary", cfg.vocab_size),
        ("context", cfg.max_position_embeddings),
        ("tied embeddings", "yes" if cfg.tie_word_embeddings else "no"),
    ):
        shape.add_row(key, str(value))
    console.print(shape)

    params = Table(title="Parameters (tied weights counted once)", title_justify="left")
    params.add_column("part")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    total = max(costs.total_params, 1)
    for part in PARTS:
        n = costs.params[part]
        if n or part != "other":
            params.add_row(part, f"{n:,}", f"{100 * n / total:.1f}%")
    params.add_row("[bold]total", f"[bold]{costs.total_params:,}", f"{human_count(costs.total_params)}")
    console.print(params)

    weights = Table(
        title="Weights, whole model on one rank (int8: per-row scales included)", title_justify="left"
    )
    weights.add_column("dtype")
    weights.add_column("bytes", justify="right")
    weights.add_column("", justify="right")
    weights.add_column("vs file", justify="right")
    for d, n in costs.weight_bytes.items():
        label = f"{d} (served: --dtype auto)" if d == served else d
        weights.add_row(label, f"{n:,}", human_bytes(n), f"{n / max(costs.file_bytes, 1):.2f}x")
    console.print(weights)
    kv_total = costs.kv_bytes_per_token * costs.kv_tokens
    console.print(
        f"KV cache ({costs.kv_dtype}): {costs.kv_bytes_per_token:,} bytes per token; {costs.max_num_seqs} sequences x "
        f"{costs.max_model_len} tokens = {costs.kv_tokens:,} tokens = {human_bytes(kv_total)} (TP 1)\n"
    )

    dtypes = list(costs.weight_bytes)
    tp = Table(
        title="Tensor-parallel split: what each rank holds (weights and KV cache)", title_justify="left"
    )
    for col in (
        "TP",
        "rank",
        "query heads",
        "KV heads",
        "MLP columns",
        "vocab rows",
        *dtypes,
        "KV / token",
        "KV cache",
    ):
        tp.add_column(
            col, justify="left" if "heads" in col or col in ("MLP columns", "vocab rows") else "right"
        )
    replicated: dict[str, int] = {}
    for s in costs.splits:
        if not s.possible:
            tp.add_row(str(s.tp), "-", "[red]impossible", *[""] * (5 + len(dtypes)), end_section=True)
            continue
        for r in s.ranks:
            if s.tp > 1:
                replicated.update({d: r.weights[d].replicated for d in dtypes})
            kv = _span(r.kv_heads) + (" copy" if r.kv_replicated else "")
            tp.add_row(str(s.tp) if r.rank == 0 else "", str(r.rank), _span(r.q_heads), kv,
                       _span(r.mlp_columns), _span(r.vocab_rows),
                       *[human_bytes(r.weights[d].total) for d in dtypes],
                       f"{r.kv_bytes_per_token:,}", human_bytes(r.kv_cache_bytes),
                       end_section=r.rank == s.tp - 1)  # fmt: skip
    console.print(tp)
    if replicated:
        each = ", ".join(f"{d} {human_bytes(n)}" for d, n in replicated.items())
        console.print(
            f"Replicated on every rank whatever the TP size ({each}): norms, biases and the int8 scales "
            "of row-parallel layers; the rest is this rank's slice."
        )
    console.print("'copy': this KV head is held by several ranks (TP above the KV head count).\n")

    pools = ", ".join(f"{p} {human_bytes(n)}" for p, n in free.items())
    verdicts = Table(title=f"Does it fit? Free memory now: {pools}", title_justify="left")
    verdicts.add_column("TP", justify="right")
    verdicts.add_column("dtype")
    verdicts.add_column("largest rank", justify="right")
    verdicts.add_column("verdict")
    for s in costs.splits:
        if not s.possible:
            verdicts.add_row(str(s.tp), "-", "-", f"[red]impossible: {s.error}")
        for f in (f for f in fits if f.tp == s.tp):
            biggest = max(r.total_bytes(f.dtype) for r in s.ranks)
            style = "green" if f.fits else "yellow" if f.weights_fit else "red"
            verdicts.add_row(str(s.tp), f.dtype, human_bytes(biggest), f"[{style}]{f.verdict}")
    console.print(verdicts)
    console.print(f"Counted: weights + KV cache. Not counted: {RANK_RUNTIME_NOTE}.")
