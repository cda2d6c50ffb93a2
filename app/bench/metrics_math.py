"""The serving metrics of `shardserve bench serve`, as pure functions of what the client recorded.

Definitions follow `vllm bench serve` (vllm/benchmarks/serve.py, calculate_metrics), so figures
from either tool compare:
- TTFT: first output chunk's arrival - the request's send time.
- E2EL: last output chunk's arrival - send time (the trailing usage chunk and [DONE] carry no token).
- ITL: the gaps between consecutive output chunks, pooled over every request.
- TPOT: (E2EL - TTFT) / (output tokens - 1), only for requests with more than one output token
  (for goodput a one-token request counts as TPOT 0, as vLLM does).
- Throughputs divide by the benchmark's wall time: completed requests, output tokens, and input +
  output tokens of the completed requests.
- Goodput: completed requests per second whose every named SLO (ttft, tpot, e2el; milliseconds)
  holds, metric <= SLO.
- Percentiles interpolate linearly between order statistics (numpy's default method).
One deviation: an "output chunk" is a chunk that carries text. vLLM counts every chunk with
choices, but servers differ in the empty ones they send (ours sends the assistant role before any
token exists, llama-server a finish chunk after the last), which would make TTFT meaningless and
pad ITL with zero gaps."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SLO_NAMES = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it; times are time.perf_counter() seconds."""

    success: bool
    start: float  # when the request was sent
    chunk_times: tuple[float, ...] = ()  # arrival of each chunk that carried output text
    prompt_tokens: int = 0  # the server's usage.prompt_tokens, else the client's count
    output_tokens: int = 0  # usage.completion_tokens, else the re-tokenized text
    error: str = ""


def ttft(r: RequestRecord) -> float:
    return r.chunk_times[0] - r.start


def e2el(r: RequestRecord) -> float:
    return r.chunk_times[-1] - r.start


def itls(r: RequestRecord) -> list[float]:
    return [b - a for a, b in itertools.pairwise(r.chunk_times)]


def tpot(r: RequestRecord) -> float | None:
    """None for a request of one output token or none: it has no decode phase to time."""
    if r.output_tokens <= 1:
        return None
    return (e2el(r) - ttft(r)) / (r.output_tokens - 1)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear between closest ranks: numpy.percentile's default."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    pos = (len(s) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution_ms(
    values_s: Sequence[float], percentiles: Iterable[float] = (99,)
) -> dict[str, float | None]:
    """mean, median, std (population, as numpy.std) and the given percentiles, in milliseconds.

    An empty list gives None for each (vLLM reports 0, which reads like a real measurement)."""
    keys = ["mean", "median", "std"] + [f"p{_pname(p)}" for p in percentiles]
    if not values_s:
        return dict.fromkeys(keys, None)
    n = len(values_s)
    mean = sum(values_s) / n
    out: dict[str, float | None] = {
        "mean": mean * 1000,
        "median": percentile(values_s, 50) * 1000,
        "std": math.sqrt(sum((v - mean) ** 2 for v in values_s) / n) * 1000,
    }
    for p in percentiles:
        out[f"p{_pname(p)}"] = percentile(values_s, p) * 1000
    return out


def _pname(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or name not in SLO_NAMES:
            raise ValueError(
                f"goodput SLO {pair!r}: expected NAME:MS with NAME one of {', '.join(SLO_NAMES)}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {pair!r}: {value!r} is not a number of milliseconds") from None
        if ms < 0:
            raise ValueError(f"goodput SLO {pair!r}: must be non-negative")
        slos[name] = ms
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    values = {"ttft": ttft(r), "tpot": tpot(r) or 0.0, "e2el": e2el(r)}
    return all(values[name] <= ms / 1000 for name, ms in slos.items())


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slos: dict[str, float] | None = None,
    percentiles: Iterable[float] = (99,),
) -> dict[str, float | int | None]:
    """The run's figures under vLLM's result names (mean_ttft_ms, p99_itl_ms, output_throughput ...)."""
    # a "successful" request with no text chunk has nothing to time; the client marks it failed
    done = [r for r in records if r.success and r.chunk_times]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    out: dict[str, float | int | None] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "request_goodput": sum(meets_slos(r, slos) for r in done) / duration_s if slos else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    series = {
        "ttft": [ttft(r) for r in done],
        "tpot": [t for r in done if (t := tpot(r)) is not None],
        "itl": [gap for r in done for gap in itls(r)],
        "e2el": [e2el(r) for r in done],
    }
    percentiles = tuple(percentiles)
    for name, values in series.items():
        for stat, v in distribution_ms(values, percentiles).items():
            out[f"{stat}_{name}_ms"] = v
    return out
