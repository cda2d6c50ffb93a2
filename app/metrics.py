"""Every Prometheus metric of the server, on one registry per app (no global state).

Where each number comes from:
- per-request histograms and token counters: from the RequestOutputs as the engine thread hands
  them over (`observe_outputs`), so aborted requests are counted too (their e2e and queue time);
- per-step histograms: the engine's on_step hook;
- queue and KV-cache gauges: read from the engine's stats at scrape time (a collector), so they
  are exact when scraped instead of sampled;
- rank gauges: reported by the ranks through the pool at start-up and restarts. Rank processes
  themselves export nothing: everything reaches /metrics through the engine, so no multiprocess
  directory is needed.
Names follow the contract in shared/DESIGN.md (prefix shardserve_). Every series carries a
`model_name` label (the served model name), as vLLM's do, so one Prometheus can scrape several
models; it is added when the registry is rendered, so no metric can be defined without it."""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.engine.types import EngineStats, FinishReason, GenerateRequest, RequestOutput, StepStats

P = "shardserve_"
FINISH_REASONS = ("stop", "length", "tool_calls", "timeout", "error", "abort")
REJECT_REASONS = ("queue_full", "invalid", "unauthorized", "too_large", "not_ready")

_LATENCY = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_BATCH = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


@dataclass
class _Req:
    arrival: float
    prompt_tokens: int
    open_choices: int
    first_token: float | None = None
    last_token: float | None = None
    queue_time: float | None = None
    generated: int = 0


class _EngineCollector(Collector):
    """Queue and KV gauges, computed from a fresh EngineStats on each scrape."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.stats = stats

    def collect(self):  # type: ignore[no-untyped-def]
        s = self.stats() or EngineStats()
        yield GaugeMetricFamily(P + "requests_running", "Sequences in the running batch.", value=s.running)
        yield GaugeMetricFamily(P + "requests_waiting", "Sequences waiting to be scheduled.", value=s.waiting)
        yield GaugeMetricFamily(
            P + "queued_tokens", "Prompt tokens admitted but not yet computed.", value=s.queued_tokens
        )
        yield GaugeMetricFamily(
            P + "kv_cache_usage_ratio",
            "KV blocks held by running or waiting sequences over all blocks (cached, unheld blocks count as free).",
            value=s.kv_cache_usage_ratio,
        )
        blocks = GaugeMetricFamily(P + "kv_cache_blocks", "KV cache blocks by state.", labels=["state"])
        blocks.add_metric(["used"], s.kv_blocks_used)
        blocks.add_metric(["cached"], s.kv_blocks_cached)
        blocks.add_metric(["free"], s.kv_blocks_total - s.kv_blocks_used - s.kv_blocks_cached)
        yield blocks
        for name, help_text in (
            ("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."),
            ("prefix_cache_hits_total", "Prompt tokens found in the prefix cache."),
            ("preemptions_total", "Sequences preempted (recomputed later) for lack of KV blocks."),
        ):
            yield CounterMetricFamily(P + name.removesuffix("_total"), help_text, value=getattr(s, name))


class _Labelled:
    """A registry as /metrics renders it: each sample with constant labels added (model_name)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry, self.labels = registry, labels

    def collect(self):  # type: ignore[no-untyped-def]
        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield out


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name  # the model_name label of every series
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter(
            P + "requests_finished", "Finished requests by finish reason.", ["reason"], registry=r
        )
        self.rejected = Counter(
            P + "requests_rejected", "Requests refused before the engine.", ["reason"], registry=r
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.ttft = Histogram(
            P + "time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds",
            "Gap between tokens of one choice.",
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            P + "time_per_output_token_seconds",
            "(e2e - TTFT) / (tokens - 1) per request.",
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds",
            "Arrival to finish (aborted requests included).",
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_time = Histogram(
            P + "queue_time_seconds", "Arrival to first scheduled step.", buckets=_LATENCY, registry=r
        )
        self.req_prompt = Histogram(
            P + "request_prompt_tokens", "Prompt length per request.", buckets=_TOKENS, registry=r
        )
        self.req_gen = Histogram(
            P + "request_generation_tokens", "Generated tokens per request.", buckets=_TOKENS, registry=r
        )
        self.batch_size = Histogram(
            P + "batch_size", "Sequences per engine step.", buckets=_BATCH, registry=r
        )
        self.step_duration = Histogram(
            P + "step_duration_seconds", "Duration of one engine step.", buckets=_LATENCY, registry=r
        )
        self.weight_bytes = Gauge(
            P + "weight_bytes", "Bytes of the weight arena of each rank.", ["rank"], registry=r
        )
        self.rank_up = Gauge(
            P + "rank_up", "1 while the rank process is alive and loaded.", ["rank"], registry=r
        )
        self.pool_restarts = Counter(
            P + "pool_restarts", "Restarts of the worker pool after a rank failure.", registry=r
        )
        self.http_requests = Counter(
            P + "http_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.build_info = Info(P + "build", "Version of shardserve and torch.", registry=r)
        self.model_info = Info(P + "model", "The served model and its configuration.", registry=r)
        self._reqs: dict[str, _Req] = {}
        try:
            version = importlib.metadata.version("shardserve")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        self.build_info.info(
            {"version": version, "torch": _torch_version(), "python": platform.python_version()}
        )
        self._engine_stats: Callable[[], EngineStats | None] = lambda: None
        r.register(_EngineCollector(lambda: self._engine_stats()))

    def bind_engine(self, stats: Callable[[], EngineStats | None]) -> None:
        self._engine_stats = stats

    # ---- request lifecycle (any thread; prometheus_client is thread-safe) -------------------

    def request_added(self, req: GenerateRequest) -> None:
        self._reqs[req.request_id] = _Req(req.arrival_time, len(req.prompt_token_ids), req.sampling.n)

    def observe_ranks(self, tp: int, up: bool, weight_bytes: dict[int, int]) -> None:
        """The pool's word on its ranks: at start, when marked down, after a restart."""
        for r in range(tp):
            self.rank_up.labels(str(r)).set(1 if up else 0)
        for r, n in weight_bytes.items():
            self.weight_bytes.labels(str(r)).set(n)

    def observe_step(self, stats: StepStats) -> None:
        self.batch_size.observe(stats.num_seqs)
        self.step_duration.observe(stats.duration)

    def observe_outputs(self, outputs: list[RequestOutput], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for out in outputs:
            req = self._reqs.get(out.request_id)
            if req is None:
                continue
            if out.token_ids:
                self.generation_tokens.inc(len(out.token_ids))
                req.generated += len(out.token_ids)
                if req.first_token is None:
                    req.first_token = now
                    self.ttft.observe(now - req.arrival)
                elif req.last_token is not None:
                    self.itl.observe(now - req.last_token)
                req.last_token = now
            if out.queue_time is not None and req.queue_time is None:
                req.queue_time = out.queue_time
                self.queue_time.observe(out.queue_time)
            if out.finish_reason is not None:
                req.open_choices -= 1
                if req.open_choices == 0:
                    self._finish(out.request_id, req, out.finish_reason, now)

    def _finish(self, request_id: str, req: _Req, reason: FinishReason, now: float) -> None:
        del self._reqs[request_id]
        self.finished.labels(reason.value).inc()
        self.prompt_tokens.inc(req.prompt_tokens)
        self.req_prompt.observe(req.prompt_tokens)
        self.req_gen.observe(req.generated)
        self.e2e.observe(now - req.arrival)
        if req.queue_time is None:  # never scheduled (aborted or failed while waiting)
            self.queue_time.observe(now - req.arrival)
        if req.first_token is not None and req.generated > 1:
            self.tpot.observe((req.last_token - req.first_token) / (req.generated - 1))

    def render(self) -> bytes:
        return generate_latest(_Labelled(self.registry, {"model_name": self.model_name}))  # type: ignore[arg-type]
