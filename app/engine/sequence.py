"""One choice of one request, as the engine thread sees it: tokens, KV blocks, progress.

A request with n > 1 becomes n Sequences with the same request_id and different index; they share
the prompt's full KV blocks through the prefix cache (BlockManager ref counts), not through any
link between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from app.engine.types import (
    FinishReason,
    GenerateRequest,
    GrammarMatcher,
    PromptLogprobs,
    SamplingParams,
    ScoredToken,
)


class SeqStatus(Enum):
    """Where a sequence is in its life.

    Allowed transitions (everything else is a bug):
        WAITING   -> RUNNING    admitted by the scheduler (blocks allocated, prefix cache looked up)
        RUNNING   -> PREEMPTED  out of KV blocks: blocks freed, num_computed_tokens reset to 0, put back
                                at the front of the waiting queue; its output tokens are kept and are
                                recomputed as part of its prompt when it runs again
        PREEMPTED -> RUNNING    re-admitted (PREEMPTED is a waiting state: queued, holding no blocks)
        WAITING | RUNNING | PREEMPTED -> FINISHED   stop, length, abort, timeout, error, unschedulable
    """

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: two sequences with equal fields are still two sequences
class Sequence:
    """Mutable, owned by the engine thread alone; never crosses a thread or process boundary."""

    seq_id: int  # engine-unique; the ranks know the sequence by this id only
    request_id: str
    index: int  # which of the request's n choices
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival_time: float = 0.0  # time.monotonic() when the API accepted the request
    priority: int = 0  # lower runs first; FCFS within a priority
    deadline: float | None = None  # time.monotonic() after which the engine ends it with TIMEOUT
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    # Tokens whose KV is in the cache (or is being written by the step just planned: the scheduler
    # advances this when it schedules, as vLLM v1 does).
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)  # covers exactly [0, num_computed_tokens)
    # Content hashes of this sequence's full blocks, in order; kept across preemption because tokens
    # are only ever appended, so they never go stale. Filled in by the BlockManager.
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    sent_to_ranks: bool = False  # rank 0 holds its SeqSampling (sent with the first plan it is in)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # time.monotonic() of first admission (queue time)
    finish_reason: FinishReason | None = None  # set by the engine's output loop
    # llguidance matcher of a constrained sequence (app/engine/grammar.py): fed every sampled token,
    # it gives the mask of the next one. Kept across preemption: output tokens are never taken back.
    matcher: GrammarMatcher | None = None
    # With sampling.prompt_logprobs: prompt tokens 1.. scored so far, by position - 1; handed out with
    # the first output. A chunk computed again after a preemption scores the same tokens the same way.
    scored_prompt: list[ScoredToken | None] = field(default_factory=list)

    @classmethod
    def from_request(
        cls, req: GenerateRequest, index: int, seq_id: int, matcher: GrammarMatcher | None = None
    ) -> Sequence:
        """Choice `index` of a request; a constrained request's choice comes with its own matcher."""
        return cls(
            seq_id=seq_id,
            request_id=req.request_id,
            index=index,
            prompt_token_ids=tuple(req.prompt_token_ids),
            sampling=req.sampling,
            arrival_time=req.arrival_time,
            priority=req.priority,
            deadline=req.deadline,
            matcher=matcher,
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens known but not yet in the KV cache: the rest of a prefill, or 1 when decoding."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def is_decoding(self) -> bool:
        """Running and only its last sampled token is left to compute."""
        return self.num_uncomputed_tokens == 1 and bool(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prompt must be scored: computed whole (no prefix cache hits), logits for every row."""
        return self.sampling.prompt_logprobs is not None and not self.output_token_ids

    def prompt_logprob_rows(self, start: int, n: int) -> int:
        """How many of the rows at positions [start, start + n) score a prompt token (the row at p
        scores the token at p + 1); the prompt's last row samples the first output instead."""
        if not self.needs_prompt_logprobs:
            return 0
        return max(0, min(start + n, self.num_prompt_tokens - 1) - start)

    def add_scored_prompt(self, part: PromptLogprobs) -> None:
        if not self.scored_prompt:
            self.scored_prompt = [None] * (self.num_prompt_tokens - 1)
        first = part.first_pos - 1
        self.scored_prompt[first : first + len(part.tokens)] = part.tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def token_ids(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens at positions [start, end) without building the whole token list (decode is hot)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return tuple(self.output_token_ids[start - p : end - p])
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + tuple(self.output_token_ids[: end - p])

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
