"""Batched sampling on rank 0: penalties, bias, temperature, top-k/top-p/min-p, seeds, logprobs.

Every row is processed with the same vectorised ops whatever its neighbours, and a seeded row
draws from its own generator seeded by (seed, index of the token it samples), so a seeded choice
samples the same tokens in any batch, and again after a preemption recomputes it.

Logprobs are those of the model's raw distribution (log_softmax of the logits before penalties,
temperature and truncation), as vLLM reports them by default."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.engine.types import SampledToken, SamplingParams, SeqSampling


@dataclass
class _SeqState:
    params: SamplingParams
    eos_ids: tuple[int, ...]
    prompt_ids: torch.Tensor  # long, for the repetition penalty
    output_counts: dict[int, int] = field(default_factory=dict)


def _generator_for(seed: int, index: int) -> torch.Generator:
    # A generator per (seed, token index): a pure function of the request, not of the batch.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.states: dict[int, _SeqState] = {}
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def add(self, seq: SeqSampling) -> None:
        self.states[seq.seq_id] = _SeqState(
            seq.params, seq.eos_token_ids, torch.tensor(seq.prompt_token_ids, dtype=torch.long)
        )

    def drop(self, seq_id: int) -> None:
        self.states.pop(seq_id, None)

    def _penalize(self, logits: torch.Tensor, row: int, st: _SeqState, n_out: int) -> None:
        p, x = st.params, logits[row]
        if p.logit_bias:
            ids = torch.tensor([i for i, _ in p.logit_bias])
            x.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=x.dtype))
        if p.repetition_penalty != 1.0:
            seen = torch.cat([st.prompt_ids, torch.tensor(list(st.output_counts), dtype=torch.long)]).unique()
            vals = x[seen]
            x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and st.output_counts:
            ids = torch.tensor(list(st.output_counts))
            counts = torch.tensor(list(st.output_counts.values()), dtype=x.dtype)
            x.index_add_(0, ids, -(p.frequency_penalty * counts + p.presence_penalty))
        if n_out < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(st.eos_ids))
            if banned:
                x[torch.tensor(banned)] = float("-inf")

    def sample(self, logits: torch.Tensor, seq_ids: list[int], num_outputs: list[int]) -> list[SampledToken]:
        """logits [S, V] (fp32, rows in the order of seq_ids) -> one token per row."""
        logits = logits[:, : self.vocab_size].float()
        raw = logits.clone() if any(self.states[s].params.logprobs is not None for s in seq_ids) else None
        states = [self.states[s] for s in seq_ids]
        for row, (st, n_out) in enumerate(zip(states, num_outputs, strict=True)):
            self._penalize(logits, row, st, n_out)
        tokens = logits.argmax(dim=-1)
        sampled_rows = [r for r, st in enumerate(states) if not st.params.greedy]
        if sampled_rows:
            idx = torch.tensor(sampled_rows)
            probs = self._probs(logits[idx], [states[r].params for r in sampled_rows])
            for j, r in enumerate(sampled_rows):
                seed = states[r].params.seed
                g = self.generator if seed is None else _generator_for(seed, num_outputs[r])
                # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p (one draw per token).
                e = torch.empty_like(probs[j]).exponential_(generator=g)
                tokens[r] = (probs[j] / e).argmax()
        out = []
        logprobs = torch.log_softmax(raw, dim=-1) if raw is not None else None
        for row, (sid, st) in enumerate(zip(seq_ids, states, strict=True)):
            tok = int(tokens[row])
            st.output_counts[tok] = st.output_counts.get(tok, 0) + 1
            lp, top = None, ()
            if logprobs is not None and st.params.logprobs is not None:
                lp = float(logprobs[row, tok])
                if st.params.logprobs > 0:
                    vals, ids = logprobs[row].topk(st.params.logprobs)
                    top = tuple(zip(ids.tolist(), vals.tolist(), strict=True))
            out.append(SampledToken(sid, tok, lp, top))
        return out

    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
        logits = logits / temps
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            v = logits.shape[-1]
            ks = torch.tensor([k if 0 < k < v else v for k in top_k])[:, None]
            ranks = torch.arange(v)[None, :]
            cut = ranks >= ks
            probs_sorted = sorted_logits.softmax(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
            mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
            cut |= mass_before >= torch.tensor(top_p, dtype=logits.dtype)[:, None]
            sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        if any(m > 0 for m in min_p):
            floor = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, dtype=probs.dtype)[:, None]
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs
