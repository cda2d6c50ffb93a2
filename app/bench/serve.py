"""`shardserve bench serve`: load any OpenAI-compatible server and report vLLM's serving metrics.

Streams every request (httpx, asyncio), --max-concurrency at a time, arriving all at once or as a
Poisson process of --request-rate per second, and reports TTFT, TPOT, ITL and E2EL (mean, median,
p99), throughputs and goodput with `vllm bench serve`'s definitions (app/bench/metrics_math.py).
Synthetic prompts are random common words sized with the server's /tokenize when it has one;
output tokens come from the server's usage (stream_options.include_usage), else from re-tokenizing
the text; the report says which. The exit code is 1 when any request failed."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from app.bench.metrics_math import RequestRecord, itls, parse_goodput, summarize
from app.bench.roofline import DEFAULT_BANDWIDTH_GBS, roofline, roofline_line
from app.bench.serve_client import Sent, ServerTokenizer, first_model, payload, stream_request

_COMMON_WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education river green small large early young important few public bad "
    "same able last long great little own other old big high different local"
)
WORDS = _COMMON_WORDS.split()


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int  # as the server's tokenizer counts it, or the approximation
    output_len: int


@dataclass(frozen=True)
class ServeConfig:
    base_url: str
    model: str | None = None
    endpoint: str = "completions"  # or "chat"
    num_prompts: int = 16
    max_concurrency: int | None = None
    request_rate: float = float("inf")
    input_len: int = 128
    output_len: int = 128
    prefix_len: int = 0  # tokens of one prefix shared by every prompt (the prefix-cache workload)
    ignore_eos: bool = False
    dataset: str = "synthetic"  # or a JSON / JSONL file of {"prompt": ..., "output_len"?: ...}
    seed: int = 0
    temperature: float = 0.0  # greedy: the same work for every server, run after run
    goodput: tuple[str, ...] = ()
    warmup: int = 1
    api_key: str | None = None
    timeout_s: float = 1800.0


async def _sized_text(rng: random.Random, length: int, tok: ServerTokenizer | None) -> tuple[str, int]:
    """Random words of about `length` tokens (a common word is about one token in a big vocabulary).
    With the server's tokenizer the word count follows the measured tokens per word for a few rounds,
    keeping the closest text, a shorter one on ties."""
    words = [rng.choice(WORDS) for _ in range(length)]
    if tok is None:
        return " ".join(words), length
    n, best, tried = length, ("", 0), set()
    for _ in range(8):
        words += [rng.choice(WORDS) for _ in range(n - len(words))]
        text = " ".join(words[:n])
        count = await tok.count(text)
        tried.add(n)
        if not best[0] or (abs(count - length), count > length) < (abs(best[1] - length), best[1] > length):
            best = (text, count)
        if count == length:
            break
        step = round((length - count) * n / max(1, count)) or (1 if count < length else -1)
        n = max(1, n + step)
        if n in tried:
            break
    return best


def _read_dataset(path: Path) -> list[dict[str, Any]]:
    raw = path.read_text()
    items = (
        json.loads(raw)
        if raw.lstrip().startswith("[")
        else [json.loads(x) for x in raw.splitlines() if x.strip()]
    )
    return [{"prompt": x} if isinstance(x, str) else x for x in items]


async def build_prompts(cfg: ServeConfig, tok: ServerTokenizer | None) -> list[Prompt]:
    rng = random.Random(cfg.seed)
    if cfg.dataset != "synthetic":
        items = _read_dataset(Path(cfg.dataset))
        if not items:
            raise ValueError(f"{cfg.dataset}: no prompts")
        picked = [items[i % len(items)] for i in range(cfg.num_prompts)]
        out = []
        for it in picked:
            text = it["prompt"]
            n = await tok.count(text) if tok else len(text.split())
            out.append(Prompt(text, n, int(it.get("output_len", cfg.output_len))))
        return out
    prefix, prefix_n = ("", 0)
    if cfg.prefix_len:
        prefix, prefix_n = await _sized_text(rng, cfg.prefix_len, tok)
        prefix += "\n"
    prompts = []
    for _ in range(cfg.num_prompts):
        text, n = await _sized_text(rng, cfg.input_len, tok)
        prompts.append(Prompt(prefix + text, prefix_n + n, cfg.output_len))
    return prompts


def arrival_offsets(n: int, rate: float, rng: random.Random) -> list[float]:
    """Send times from the start: all at once for an infinite rate, else a Poisson process
    rescaled to last exactly n / rate seconds (as vLLM does, so seeds do not move throughput)."""
    if rate == float("inf"):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return [x * (n / rate) / out[-1] for x in out]


async def run(cfg: ServeConfig, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark; the result holds vLLM's result fields plus how tokens were counted."""
    base = cfg.base_url.rstrip("/")
    slos = parse_goodput(cfg.goodput)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    timeout = httpx.Timeout(cfg.timeout_s, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = cfg.model or await first_model(client, base)
        tok = await ServerTokenizer.probe(client, base, model)
        prompts = await build_prompts(cfg, tok)
        url = f"{base}/v1/{'chat/completions' if cfg.endpoint == 'chat' else 'completions'}"

        def body(p: Prompt) -> dict[str, Any]:
            return payload(cfg.endpoint, model, p.text, p.output_len, ignore_eos=cfg.ignore_eos,
                           temperature=cfg.temperature)  # fmt: skip

        for _ in range(cfg.warmup):  # also checks the arguments before the clock starts
            w = await stream_request(client, url, body(prompts[0]))
            if not w.success:
                raise RuntimeError(f"the warm-up request failed: {w.error}")

        sem = asyncio.Semaphore(cfg.max_concurrency or len(prompts))
        bar = tqdm(total=len(prompts), disable=not progress, desc="requests", file=sys.stderr)
        offsets = arrival_offsets(len(prompts), cfg.request_rate, random.Random(cfg.seed + 1))
        t0 = time.perf_counter()

        async def one(p: Prompt, at: float) -> Sent:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            async with sem:
                sent = await stream_request(client, url, body(p))
            bar.update(1)
            return sent

        sents = await asyncio.gather(*(one(p, at) for p, at in zip(prompts, offsets, strict=True)))
        duration = time.perf_counter() - t0
        bar.close()
        records, out_sources = [], Counter()
        for p, s in zip(prompts, sents, strict=True):
            n_out, source = s.completion_tokens, "usage"
            if n_out is None and s.success:
                n_out, source = (
                    (await tok.count(s.text), "tokenize") if tok else (len(s.chunk_times), "chunks")
                )
            if s.success:
                out_sources[source] += 1
            records.append(
                RequestRecord(s.success, s.start, tuple(s.chunk_times), s.prompt_tokens or p.tokens, n_out or 0,
                              s.error)
            )  # fmt: skip
    result: dict[str, Any] = {
        "base_url": base, "model": model, "endpoint": cfg.endpoint, "num_prompts": len(prompts),
        "max_concurrency": cfg.max_concurrency, "input_len": cfg.input_len,
        "request_rate": None if cfg.request_rate == float("inf") else cfg.request_rate,  # JSON has no inf
        "output_len": cfg.output_len, "prefix_len": cfg.prefix_len, "ignore_eos": cfg.ignore_eos,
        "dataset": cfg.dataset, "goodput_slos_ms": slos or None,
        "prompt_token_source": f"server /tokenize ({tok.shape} shape)" if tok else "approximate (1 token per word)",
        "output_token_source": dict(out_sources),
    }  # fmt: skip
    result.update(summarize(records, duration, slos))
    result["input_lens"] = [r.prompt_tokens for r in records]
    result["output_lens"] = [r.output_tokens for r in records]
    result["ttfts"] = [r.chunk_times[0] - r.start if r.chunk_times else None for r in records]
    result["itls"] = [itls(r) for r in records]
    result["latencies"] = [r.chunk_times[-1] - r.start if r.chunk_times else None for r in records]
    result["errors"] = [r.error for r in records]
    return result


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def report(result: dict[str, Any]) -> str:
    r = result
    rows = [
        ("completed / failed", f"{r['completed']} / {r['failed']}"),
        ("max concurrency", r["max_concurrency"] or "unbounded"),
        ("request rate (req/s)", r["request_rate"] or "all at once"),
        ("duration (s)", r["duration"]),
        ("total input / output tokens", f"{r['total_input_tokens']} / {r['total_output_tokens']}"),
        ("request throughput (req/s)", r["request_throughput"]),
        ("output token throughput (tok/s)", r["output_throughput"]),
        ("total token throughput (tok/s)", r["total_token_throughput"]),
    ]
    if r["request_goodput"] is not None:
        rows.append((f"request goodput (req/s) at {r['goodput_slos_ms']} ms", r["request_goodput"]))
    rows += [("prompt tokens counted by", r["prompt_token_source"]),
             ("output tokens counted by", ", ".join(f"{k}: {v}" for k, v in r["output_token_source"].items()) or "–")]  # fmt: skip
    lines = [f"## shardserve bench serve: {r['model']} at {r['base_url']} ({r['endpoint']})", "",
             "| figure | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows), "",
             "| ms | mean | median | p99 |", "|---|---|---|---|"]  # fmt: skip
    for m in ("ttft", "tpot", "itl", "e2el"):
        lines.append(
            f"| {m.upper()} | " + " | ".join(_fmt(r[f"{s}_{m}_ms"]) for s in ("mean", "median", "p99")) + " |"
        )
    if r.get("roofline"):
        lines += ["", r["roofline"]]
    errors = Counter(e for e in r["errors"] if e)
    if errors:
        lines += ["", "failures:", *(f"- {n}× {e}" for e, n in errors.most_common(5))]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardserve bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of the server's /v1/models")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="completions")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); default: all at once"
    )
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=0, help="tokens of a prefix every prompt shares")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--dataset", default="synthetic", help="synthetic, or a JSON/JSONL file of {prompt, output_len?}"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs: ttft:MS tpot:MS e2el:MS"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (0: none)")
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--roofline-model",
        type=Path,
        default=None,
        help="the served model file: adds the batch-1 roofline line",
    )
    p.add_argument("--bandwidth-gbs", type=float, default=DEFAULT_BANDWIDTH_GBS)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="write the full result here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    cfg = ServeConfig(
        a.base_url, a.model, a.endpoint, a.num_prompts, a.max_concurrency, a.request_rate, a.input_len,
        a.output_len, a.prefix_len, a.ignore_eos, a.dataset, a.seed, a.temperature, tuple(a.goodput), a.warmup,
        a.api_key,
    )  # fmt: skip
    try:
        result = asyncio.run(run(cfg, progress=not a.no_progress))
    except (RuntimeError, ValueError, httpx.HTTPError) as e:
        print(f"shardserve bench serve: {e}", file=sys.stderr)
        return 1
    if a.roofline_model is not None:
        rows = roofline(a.roofline_model)
        result["roofline"] = roofline_line(rows, a.bandwidth_gbs, result["median_tpot_ms"])
    print(report(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 1 if result["failed"] else 0
