"""Prompt logprobs: the logits of a chunk's prompt rows, scored against the prompt token after each.

Every rank computes those logits (the LM head's all-gather is a collective, so all ranks make the
same calls in the same order, decided by the plan alone); rank 0, which holds each sequence's prompt
and sampling parameters, scores them. A row's logits do not depend on the rows computed beside it
(the LM head is batch-invariant), so a prompt scored in a batch scores as it would alone, and a
chunk computed again after a preemption scores the same.

Logprobs are those of the model's raw distribution (log_softmax of the logits), as the sampler's."""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.engine.types import PromptLogprobs, ScoredToken, StepPlan
from app.worker.sampler import Sampler

SLICE_ROWS = 128  # logits of at most this many rows at once: [128, 49152] fp32 is 25 MB


def score_prompts(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    plan: StepPlan,
    sampler: Sampler | None,
) -> tuple[PromptLogprobs, ...]:
    """hidden: the plan's hidden states [tokens, hidden], chunk after chunk. Every rank calls this;
    only the driver (sampler given) returns anything."""
    out: list[PromptLogprobs] = []
    row0 = 0
    for c in plan.chunks:
        scored: list[ScoredToken] = []
        for lo in range(0, c.prompt_logprob_rows, SLICE_ROWS):
            hi = min(lo + SLICE_ROWS, c.prompt_logprob_rows)
            logits = compute_logits(hidden[row0 + lo : row0 + hi])
            if sampler is not None:
                st = sampler.states[c.seq_id]
                targets = st.prompt_ids[c.start_pos + 1 + lo : c.start_pos + 1 + hi]
                k = st.params.prompt_logprobs or 0
                scored += _score(logits[:, : sampler.vocab_size].float(), targets, k)
        if sampler is not None and c.prompt_logprob_rows:
            out.append(PromptLogprobs(c.seq_id, c.start_pos + 1, tuple(scored)))
        row0 += len(c.token_ids)
    return tuple(out)


def _score(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[ScoredToken]:
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, targets[:, None])
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(targets)
    if k > 0:
        vals, ids = logprobs.topk(k, dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    return [
        ScoredToken(t, lp, r, top)
        for t, lp, r, top in zip(targets.tolist(), chosen[:, 0].tolist(), ranks, tops, strict=True)
    ]
