"""The engine loop: inbox, schedule, execute, process outputs — on its own thread.

One thread owns every Sequence, the scheduler and the block manager; the asyncio side only posts
commands to the inbox and receives RequestOutputs through a callback. The ranks compute in their
own processes, so this thread mostly waits on them and the event loop stays responsive."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from app.engine.block_manager import BlockManager
from app.engine.grammar import GrammarCompiler
from app.engine.output import OutputProcessor
from app.engine.scheduler import Scheduler, SchedulerConfig
from app.engine.sequence import Sequence
from app.engine.types import (
    NO_TOKEN,
    DetokenizerFactory,
    EngineStats,
    Executor,
    FinishReason,
    GenerateRequest,
    RequestOutput,
    SampledToken,
    StepStats,
    TokenDecoder,
)

log = logging.getLogger("shardserve.engine")


@dataclass(frozen=True)
class EngineHooks:
    """Where the engine thread hands its results; both run on the engine thread."""

    on_outputs: Callable[[list[RequestOutput]], None]
    on_step: Callable[[StepStats], None] = lambda s: None


@dataclass
class _Add:
    request: GenerateRequest


@dataclass
class _Abort:
    request_id: str


@dataclass
class Engine:
    executor: Executor
    config: SchedulerConfig
    num_blocks: int
    tokenizer: TokenDecoder
    detokenizer_factory: DetokenizerFactory
    hooks: EngineHooks
    enable_prefix_caching: bool = True
    grammars: GrammarCompiler | None = None  # needed for requests with a grammar
    idle_poll: float = 0.5  # seconds between liveness checks while idle
    _inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        eos = tuple(self.tokenizer.eos_token_ids)
        self.block_manager = BlockManager(self.num_blocks, self.config.block_size, self.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager, eos_token_ids=eos)
        self.outputs = OutputProcessor(
            self.tokenizer, eos, self.config.max_model_len, self.detokenizer_factory
        )
        self._seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        # Written by the engine thread alone; other threads read these references (one atomic read
        # each) and never the scheduler itself. The stats are published once per step (~70 us at 64
        # running sequences), which a step that applied commands always follows.
        self.failed: str | None = None  # set when the executor failed for good
        self._stats = self.scheduler.stats()

    # ---- thread-safe commands --------------------------------------------------------------

    def add_request(self, request: GenerateRequest) -> None:
        self._inbox.put(_Add(request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self._thread.start()

    def run_once(self) -> None:
        """Apply every queued command, then run one step: for callers that drive the engine without
        its thread (tests, `bench engine`) and so decide exactly which requests arrive before which
        step. Never mix with start()."""
        self._drain_inbox(block=False)
        self.step()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop (engine thread only) -----------------------------------------------------

    def run(self) -> None:
        while not self._stop.is_set():
            busy = self.scheduler.has_unfinished()
            self._drain_inbox(block=not busy)
            if self._stop.is_set():
                break
            try:
                self.step()
            except Exception:  # a bug in the engine must not silently kill the thread
                log.exception("engine step failed")
                self._fail_all("internal engine error")

    def _drain_inbox(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=self.idle_poll) if block else self._inbox.get_nowait()
        except queue.Empty:
            if block:
                self._check_executor()
            return
        while cmd is not None:
            self._apply(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: _Add | _Abort) -> None:
        outs: list[RequestOutput] = []
        if isinstance(cmd, _Add):
            req = cmd.request
            if self.failed is not None:
                outs = [self._error_output(req, i, self.failed) for i in range(req.sampling.n)]
            else:
                for i in range(req.sampling.n):
                    matcher = None
                    if req.grammar is not None:
                        assert self.grammars is not None, "a grammar reached an engine without a compiler"
                        matcher = self.grammars.matcher(req.grammar)  # checked by the API: cached
                    seq = Sequence.from_request(req, i, next(self._ids), matcher)
                    self._seqs[seq.seq_id] = seq
                    self.scheduler.add(seq)
        else:
            for seq in self.scheduler.abort(cmd.request_id):
                outs.append(self.outputs.finish_early(seq, FinishReason.ABORT))
                self._seqs.pop(seq.seq_id, None)
        if outs:
            self.hooks.on_outputs(outs)

    def _unschedulable(self, seq: Sequence) -> RequestOutput:
        """`length` only for a prompt that fills the context; a sequence that outgrew the KV cache
        was not cut by any limit of the request's, so it fails, saying why. (The API refuses both
        kinds of request, and the stack refuses a cache smaller than the context: this is the
        engine keeping its word when it is driven directly.)"""
        if seq.num_tokens > self.config.max_model_len:
            return self.outputs.finish_early(seq, FinishReason.LENGTH)
        capacity = self.block_manager.num_blocks * self.config.block_size
        return self.outputs.finish_early(
            seq,
            FinishReason.ERROR,
            f"the sequence outgrew the KV cache of {capacity} tokens, which is smaller than the "
            f"context of {self.config.max_model_len}",
        )

    def _error_output(self, req: GenerateRequest, index: int, msg: str) -> RequestOutput:
        return RequestOutput(
            req.request_id, index, "", (), finish_reason=FinishReason.ERROR,
            prompt_tokens=len(req.prompt_token_ids), error=msg,
        )  # fmt: skip

    def step(self) -> None:
        outs: list[RequestOutput] = self._expire(time.monotonic())
        plan = self.scheduler.schedule()
        # Drained after schedule(), which is where sequences are found unschedulable: before it, their
        # ends waited for the next step, and an idle engine only steps again after idle_poll.
        for seq in self.scheduler.drain_unschedulable():
            outs.append(self._unschedulable(seq))
            self._seqs.pop(seq.seq_id, None)
        if plan is not None:
            t0 = time.perf_counter()
            masked = [
                self._seqs[c.seq_id]
                for c in plan.chunks
                if c.sample and self._seqs[c.seq_id].matcher is not None
            ]
            masks = None
            if masked:
                plan = replace(plan, masked_seq_ids=tuple(s.seq_id for s in masked))
                grammars = self.grammars
                assert grammars is not None
                matchers = [s.matcher for s in masked]

                def masks() -> bytes:
                    return grammars.masks(matchers)

            try:
                result = self.executor.execute(plan, masks)
            except Exception as e:  # RankFailure and friends: the pool owns the details
                if outs:
                    self.hooks.on_outputs(outs)
                self._handle_failure(str(e))
                return
            now = time.monotonic()
            for part in result.prompt_logprobs:
                seq = self._seqs.get(part.seq_id)
                if seq is not None and not seq.is_finished:
                    seq.add_scored_prompt(part)
            for tok in result.tokens:
                seq = self._seqs.get(tok.seq_id)
                if seq is None or seq.is_finished:
                    continue  # aborted while the step ran
                if seq.sampling.max_tokens == 0:  # the prompt scored (echo), nothing generated
                    out = self.outputs.finish_early(seq, FinishReason.LENGTH)
                    outs.append(replace(out, prompt_logprobs=self.outputs.prompt_logprobs(seq)))
                    self.scheduler.finish(seq)
                    self._seqs.pop(seq.seq_id, None)
                    continue
                if seq.matcher is not None:
                    problem = self._advance_grammar(seq, tok)
                    if problem is not None:
                        outs.append(
                            self.outputs.finish_early(seq, FinishReason.ERROR, problem, choice_only=True)
                        )
                        self.scheduler.finish(seq)
                        self._seqs.pop(seq.seq_id, None)
                        continue
                out = self.outputs.process(seq, tok, now)
                outs.append(out)
                if out.finish_reason is not None:
                    self.scheduler.finish(seq)
                    self._seqs.pop(seq.seq_id, None)
            self.hooks.on_step(
                StepStats(
                    time.perf_counter() - t0,
                    len(plan.chunks),
                    plan.num_tokens,
                    self.scheduler.preemptions_total,
                )
            )
        self._stats = self.scheduler.stats()
        if outs:
            self.hooks.on_outputs(outs)

    @staticmethod
    def _advance_grammar(seq: Sequence, tok: SampledToken) -> str | None:
        """Feed the sampled token to the sequence's matcher; a message when the choice must end."""
        if tok.token_id == NO_TOKEN:
            return (
                "the output format allows no further token here (min_tokens, ignore_eos or stop_token_ids "
                "may forbid the only tokens the grammar accepts)"
            )
        assert seq.matcher is not None
        if not seq.matcher.consume_token(tok.token_id):
            return f"the sampled token broke the output format: {seq.matcher.get_error()}"
        return None

    def _expire(self, now: float) -> list[RequestOutput]:
        outs = []
        for seq in [s for s in self._seqs.values() if s.deadline is not None and s.deadline <= now]:
            self.scheduler.finish(seq)
            outs.append(self.outputs.finish_early(seq, FinishReason.TIMEOUT))
            self._seqs.pop(seq.seq_id, None)
        return outs

    def _check_executor(self) -> None:
        if self.failed is None:
            dead = self.executor.check_alive()
            if dead:
                self._handle_failure(dead)

    def _handle_failure(self, msg: str) -> None:
        log.error("worker ranks failed: %s", msg)
        # down first: a client that saw its request fail must never find the server ready
        self.executor.mark_down(msg)
        self._fail_all(f"the model's worker ranks failed: {msg}")
        if self.executor.restart(msg):
            self.block_manager.reset_prefix_cache()  # the restarted ranks hold no KV
        else:
            self.failed = msg

    def _fail_all(self, msg: str) -> None:
        outs = []
        for seq in list(self._seqs.values()):
            self.scheduler.finish(seq)
            outs.append(self.outputs.finish_early(seq, FinishReason.ERROR, msg))
        self._seqs.clear()
        self._stats = self.scheduler.stats()
        if outs:
            self.hooks.on_outputs(outs)

    def stats(self) -> EngineStats:
        """The snapshot the engine thread published after its last change (any thread may call it)."""
        return self._stats
