"""The one loop over a step's sampled tokens: append, detokenize, stop checks, RequestOutputs.

Text is released only when it is final: the detokenizer holds back partial UTF-8, and this module
holds back any tail that could still grow into a stop string, so a stop string split across
tokens is caught and never leaks to the client."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from app.engine.sequence import Sequence
from app.engine.types import (
    Detokenizer,
    DetokenizerFactory,
    FinishReason,
    RequestOutput,
    SampledToken,
    TokenDecoder,
    TokenLogprob,
)


@dataclass
class _Stream:
    """Per-sequence text state, created when a sequence first produces a token."""

    detok: Detokenizer
    held: str = ""  # text not yet released (could be the start of a stop string)
    emitted_tokens: int = 0
    first_token_time: float | None = None


def _hold_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep


@dataclass
class OutputProcessor:
    tokenizer: TokenDecoder
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    detokenizer_factory: DetokenizerFactory
    streams: dict[int, _Stream] = field(default_factory=dict)

    def _stream(self, seq: Sequence) -> _Stream:
        st = self.streams.get(seq.seq_id)
        if st is None:
            st = _Stream(self.detokenizer_factory(self.tokenizer, seq.sampling.skip_special_tokens))
            self.streams[seq.seq_id] = st
        return st

    def process(self, seq: Sequence, tok: SampledToken, now: float | None = None) -> RequestOutput:
        """Append one sampled token to `seq` and say what the client sees; sets seq.finish_reason."""
        p = seq.sampling
        st = self._stream(seq)
        queue_time = None
        if st.first_token_time is None:
            st.first_token_time = now if now is not None else time.monotonic()
            if seq.first_scheduled_time is not None:
                queue_time = seq.first_scheduled_time - seq.arrival_time
        seq.append_token(tok.token_id)
        n_out = seq.num_output_tokens
        reason: FinishReason | None = None
        is_end_id = (
            tok.token_id in self.eos_token_ids and not p.ignore_eos
        ) or tok.token_id in p.stop_token_ids
        if is_end_id and n_out >= p.min_tokens:
            reason = FinishReason.STOP
            new_text = ""  # the end token itself is not part of the text
        else:
            new_text = st.detok.push(tok.token_id)
        text = st.held + new_text
        st.held = ""
        stop_hit = False
        if reason is None and p.stop:
            hit = min(((text.find(s), s) for s in p.stop if s in text), default=None)
            if hit is not None:
                idx, s = hit
                text = text[: idx + len(s)] if p.include_stop_str_in_output else text[:idx]
                reason, stop_hit = FinishReason.STOP, True
        if reason is None and (n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is None:
            keep = _hold_back(text, p.stop) if p.stop else 0
            if keep:
                text, st.held = text[:-keep], text[-keep:]
        elif not stop_hit:
            text += st.detok.flush()  # the sequence is over: release what the detokenizer held
        seq.finish_reason = reason
        logprobs = ()
        if tok.logprob is not None:
            logprobs = (self._logprob(tok.token_id, tok.logprob, tok.top_logprobs),)
        if reason is not None:
            self.streams.pop(seq.seq_id, None)
        return RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            text=text,
            token_ids=(tok.token_id,),
            logprobs=logprobs,
            finish_reason=reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=n_out,
            cached_tokens=seq.num_cached_tokens,
            queue_time=queue_time,
            prompt_logprobs=self.prompt_logprobs(seq) if n_out == 1 else None,
        )

    def _logprob(
        self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...], rank: int | None = None
    ) -> TokenLogprob:
        text, raw = self.tokenizer.token_text, self.tokenizer.token_bytes
        return TokenLogprob(
            token_id, text(token_id), logprob, tuple((i, text(i), lp) for i, lp in top),
            raw(token_id), tuple(raw(i) for i, _ in top), rank,
        )  # fmt: skip

    def prompt_logprobs(self, seq: Sequence) -> tuple[TokenLogprob, ...] | None:
        """The scored prompt, for the choice's first output (None unless the request asked)."""
        if seq.sampling.prompt_logprobs is None:
            return None
        assert all(t is not None for t in seq.scored_prompt), "a prompt position was never scored"
        return tuple(self._logprob(t.token_id, t.logprob, t.top_logprobs, t.rank) for t in seq.scored_prompt)  # type: ignore[union-attr]

    def finish_early(
        self, seq: Sequence, reason: FinishReason, error: str | None = None, *, choice_only: bool = False
    ) -> RequestOutput:
        """End a sequence from outside the token stream (timeout, abort, error): release held text.

        choice_only: an ERROR that ends this choice alone (its grammar allowed no token), which keeps
        its text; any other ERROR fails the whole request and its text is dropped."""
        st = self.streams.pop(seq.seq_id, None)
        keep = reason is not FinishReason.ERROR or choice_only
        text = st.held + st.detok.flush() if st is not None and keep else ""
        seq.finish_reason = reason
        return RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            text=text,
            token_ids=(),
            finish_reason=reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            cached_tokens=seq.num_cached_tokens,
            error=error,
            choice_error=choice_only,
        )
