"""The engine's boundary: the plain, frozen types that cross it (HTTP -> engine -> ranks -> engine
-> HTTP), the failure it reports, and the Protocols of what it drives (executor, tokenizer,
detokenizer, grammar matcher) without importing them.

Nothing here holds a tensor: these values are pickled to rank processes and put on asyncio
queues, so they stay small, immutable and torch-free. Whoever needs one of these types imports
this module, never the engine loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Literal, Protocol


class FinishReason(str, Enum):
    """Why a choice ended; the first five reach HTTP clients, ABORT only the metrics."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    TOOL_CALLS = "tool_calls"  # a parsed tool call (set by the API layer, never by the engine)
    TIMEOUT = "timeout"  # the request's deadline passed; partial output is kept
    ERROR = "error"  # the ranks failed mid-request
    ABORT = "abort"  # the client went away; nobody is listening


GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplerParams:
    """What rank 0's sampler reads of a choice's sampling; nothing else of a request reaches it."""

    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW) means greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 disables
    min_p: float = 0.0  # in [0, 1]
    repetition_penalty: float = 1.0  # > 0; 1 disables (applies to prompt and output tokens)
    presence_penalty: float = 0.0  # [-2, 2], OpenAI semantics (output tokens only)
    frequency_penalty: float = 0.0  # [-2, 2], OpenAI semantics (output tokens only)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, ids already checked
    seed: int | None = None  # a seeded choice samples the same tokens whatever its batch neighbours
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled one plus k top alternatives
    # None: none; k >= 0: every prompt token's logprob (from the first on) plus k top alternatives,
    # scored on rank 0. Such a prompt is computed whole, never taken from the prefix cache.
    prompt_logprobs: int | None = None
    min_tokens: int = 0  # EOS and stop ids are masked until this many tokens exist

    @property
    def greedy(self) -> bool:
        # below this, dividing by the temperature overflows fp32 logits to inf (and probabilities to
        # NaN); such a temperature means greedy anyway (vLLM draws the line at the same place)
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class SamplingParams(SamplerParams):
    """Per-request sampling, decided by the API (app/api/prepare.py) before it reaches the engine:
    what the sampler reads, and what the engine's output loop reads besides."""

    n: int = 1  # independent choices sharing one prompt
    max_tokens: int = 16  # decided once by the API, within the context
    stop: tuple[str, ...] = ()  # stop strings, never emitted unless include_stop_str_in_output
    stop_token_ids: tuple[int, ...] = ()  # extra end ids besides the model's
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


# "json_schema" (source: the schema as JSON text), "regex", "choice" (a JSON list of strings),
# "grammar" (Lark or llama.cpp's GBNF, detected by the compiler), "lark" (llguidance's own Lark,
# which the API writes for tool calls)
GrammarKind = Literal["json_schema", "regex", "choice", "grammar", "lark"]


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained choice's output must match; compiled by app/engine/grammar.py."""

    kind: GrammarKind
    source: str


@dataclass(frozen=True)
class GenerateRequest:
    """One API request, immutable once made; the engine turns it into n Sequences."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival_time: float  # time.monotonic() when the API accepted it
    priority: int = 0  # lower runs first; FCFS within a priority
    deadline: float | None = None  # time.monotonic() after which it ends with TIMEOUT
    grammar: GrammarSpec | None = None  # constrained decoding: every choice's output matches it


# ---- engine -> ranks ---------------------------------------------------------------------


@dataclass(frozen=True)
class SeqSampling:
    """What rank 0 needs to sample for a sequence; sent once, when the sequence first runs."""

    seq_id: int
    params: SamplerParams
    prompt_token_ids: tuple[int, ...]  # for the repetition penalty and prompt scoring; else empty
    end_token_ids: tuple[int, ...]  # masked while fewer than min_tokens exist

    @classmethod
    def of(
        cls, seq_id: int, sampling: SamplingParams, index: int, prompt: tuple[int, ...], eos: tuple[int, ...]
    ) -> SeqSampling:
        """What the sampler reads of choice `index` of a request; the one place it is chosen."""
        p = sampling
        params = SamplerParams(**{f.name: getattr(p, f.name) for f in fields(SamplerParams)})
        if p.seed is not None:
            # Each choice draws its own stream, or the n choices of a seeded request would be n
            # copies; seed + index as vLLM does, so choice 0 matches the same request with n = 1.
            params = replace(params, seed=p.seed + index)
        ends = (*p.stop_token_ids, *(() if p.ignore_eos else eos)) if p.min_tokens else ()
        needs_prompt = p.repetition_penalty != 1.0 or p.prompt_logprobs is not None
        return cls(seq_id, params, prompt if needs_prompt else (), ends)


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: a prefill chunk or the single decode token."""

    seq_id: int
    token_ids: tuple[int, ...]  # the tokens computed this step
    start_pos: int  # position of token_ids[0]; the KV cache already holds positions [0, start_pos)
    block_table: tuple[int, ...]  # KV blocks covering positions [0, start_pos + len(token_ids))
    sample: bool  # sample a token after this chunk (False for all but the last prefill chunk)
    num_output_tokens: int = 0  # tokens generated so far: the seeded generator's step index
    # The first this many rows score the prompt token after them (prompt_logprobs): every rank computes
    # their logits (the LM head is a collective), rank 0 answers with a PromptLogprobs.
    prompt_logprob_rows: int = 0


@dataclass(frozen=True)
class StepPlan:
    """Everything the ranks compute in one forward; made by the scheduler each step."""

    step_id: int
    chunks: tuple[SeqChunk, ...]
    new_seqs: tuple[SeqSampling, ...] = ()  # sequences whose sampling state rank 0 must create
    finished_seq_ids: tuple[int, ...] = ()  # sampling state rank 0 may drop
    copy_blocks: tuple[tuple[int, int], ...] = ()  # (src, dst) KV block copies before the forward
    # Constrained sequences sampled this step, in this order: their token bitmasks follow the plan to
    # rank 0 as one more message, computed by the engine while the ranks run the forward.
    masked_seq_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


# ---- ranks -> engine ---------------------------------------------------------------------

NO_TOKEN = -1  # SampledToken.token_id when a constrained row's mask (with its bans) left no token


@dataclass(frozen=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float | None = None  # token_id's logprob (or logit) as --logprobs-mode says (sampler.py)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the k most likely (id, logprob)


@dataclass(frozen=True)
class ScoredToken:
    """A prompt token under the model's raw distribution at the position before it."""

    token_id: int
    logprob: float
    rank: int  # 1 + how many tokens are strictly more likely (vLLM's rank)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the k most likely (id, logprob)


@dataclass(frozen=True)
class PromptLogprobs:
    """Prompt tokens scored by one chunk: the tokens at positions first_pos, first_pos + 1, ..."""

    seq_id: int
    first_pos: int  # >= 1: the first prompt token has nothing before it to be scored by
    tokens: tuple[ScoredToken, ...]


@dataclass(frozen=True)
class StepOutput:
    """Rank 0's answer to a StepPlan: one token for every chunk with sample=True."""

    step_id: int
    tokens: tuple[SampledToken, ...]
    error: str | None = None  # a rank failed this step; every sequence in it ends with ERROR
    prompt_logprobs: tuple[PromptLogprobs, ...] = ()  # one for every chunk with prompt_logprob_rows


# ---- engine -> API -----------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str  # the token's text (U+FFFD where it holds part of a character, as vLLM)
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (id, text, logprob)
    bytes: bytes = b""  # the token's own bytes, also when they are part of a character
    top_bytes: tuple[bytes, ...] = ()  # the same for each of top
    rank: int | None = None  # prompt tokens: 1 + how many tokens were strictly more likely


@dataclass(frozen=True)
class RequestOutput:
    """A delta for one choice of a request, put on that request's queue by engine/output.py."""

    request_id: str
    index: int  # which of the n choices
    text: str  # new text since the previous output of this choice (UTF-8 complete, stop-safe)
    token_ids: tuple[int, ...]  # new token ids since the previous output
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far for this choice
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # with finish_reason ERROR: what failed
    # ERROR that ends this choice only (its grammar allowed no further token): the request still
    # answers, the choice says finish_reason "error". Otherwise ERROR fails the whole request.
    choice_error: bool = False
    queue_time: float | None = None  # on a choice's first token: arrival to its first scheduled step
    # On a choice's first output, with sampling.prompt_logprobs: prompt tokens 1.. scored (token 0 has
    # nothing before it); None otherwise.
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics, published by the engine thread after every change."""

    running: int = 0
    waiting: int = 0
    queued_tokens: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    kv_cache_usage_ratio: float = 0.0  # blocks held by sequences / all (cached, unheld ones are free)
    preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # prompt tokens found there


@dataclass(frozen=True)
class StepStats:
    """What one step did, for metrics (made by the engine thread, handed to its on_step hook)."""

    duration: float
    num_seqs: int
    num_tokens: int
    preemptions_total: int


# ---- what the engine drives, as Protocols ---------------------------------------------------


class ExecutorFailure(RuntimeError):
    """Raised by an executor whose ranks failed; the engine ends in-flight work with ERROR."""


class Executor(Protocol):
    """The worker pool as the engine sees it (app/worker/pool.py), torch-free."""

    def execute(self, plan: StepPlan, masks: Callable[[], bytes] | None = None) -> StepOutput:
        """Run a step. With plan.masked_seq_ids, masks() gives their token bitmasks; the executor
        calls it once the ranks have the plan, so the masks are computed during the forward."""
        ...

    def check_alive(self) -> str | None:
        """None while every rank lives, else which one died and how."""
        ...

    def mark_down(self, reason: str) -> None:
        """The first word of a failure, said before the engine fails the requests in flight."""
        ...

    def restart(self, reason: str) -> bool:
        """Bring the ranks back after a failure; False: given up (the engine fails for good)."""
        ...


@dataclass(frozen=True)
class Health:
    """What /health and /ready say of the engine and its ranks."""

    state: Literal["up", "restarting", "failed"]
    reason: str = ""  # with "failed": what failed, and that restarts did not help


class TokenDecoder(Protocol):
    """What the engine's output loop and the detokenizer read of a tokenizer
    (app/tokenizer/tokenizer.py implements it; the engine imports no tokenizers library)."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...

    def is_byte_fallback(self, token_id: int) -> bool: ...


class Detokenizer(Protocol):
    """Token ids in, UTF-8-complete text out (app/tokenizer/detokenizer.py)."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


# (tokenizer, skip_special_tokens) -> a fresh Detokenizer for one sequence
DetokenizerFactory = Callable[[TokenDecoder, bool], Detokenizer]


class GrammarMatcher(Protocol):
    """One constrained sequence's grammar state (an llguidance LLMatcher, app/engine/grammar.py)."""

    def consume_token(self, token_id: int) -> bool: ...

    def get_error(self) -> str: ...
