"""Constrained decoding: GrammarSpecs compiled by llguidance into per-sequence token matchers.

Why llguidance: it needs no other package (xgrammar pulls in torch, transformers and triton; the
engine imports no torch), it takes JSON schema, regex, Lark and llama.cpp's GBNF, and measured on the
default model's 49,152-token vocabulary a mask costs 27 µs per token (median; 1.5 ms for the first
mask of a schema), 16 sequences 0.94 ms per step on two threads — against a 40-120 ms step.

Where masks are computed: here, on the engine thread, while the ranks run the forward of the step
that needs them (WorkerPool.execute sends the plan first, then asks for the masks and sends them to
rank 0). Rank 0 applies them inside the batched sampler, so constrained and free rows share a step
and a free row is computed exactly as without its neighbour. The matcher state then lives beside the
Sequence that owns it, and survives preemption and rank restarts, which rank-side state would not.

Masks cross the process boundary as llguidance's bitmask: int32 words, bit i of word w allows token
32 * w + i; 6 KiB a row for this vocabulary."""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from app.engine.types import GrammarSpec

KINDS = ("json_schema", "regex", "choice", "grammar", "lark")  # lark: llguidance's own, made by the API
# JSON as json.dumps writes it (what models saw most): one space after ',' and ':', none elsewhere.
# Flexible whitespace lets a small model fill max_tokens with newlines instead of finishing the value.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The spec does not compile; the message names the problem (the API answers 400 with it)."""


def lark_for(spec: GrammarSpec) -> str:
    """The llguidance grammar text for a spec; raises GrammarError for a malformed source."""
    try:
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.source, overrides=JSON_STYLE)
        if spec.kind == "choice":
            choices = json.loads(spec.source)
            return llguidance.grammar_from("choice", choices)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "grammar":  # Lark as llguidance reads it, or GBNF converted to it
            return llguidance.grammar_from("grammar", spec.source)
        if spec.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(spec.source)
    except ValueError as e:
        raise GrammarError(str(e).strip()) from None
    raise GrammarError(f"unknown grammar kind {spec.kind!r}; expected one of {', '.join(KINDS)}")


class GrammarCompiler:
    """Compiles specs once (an LRU cache by spec) and hands out matchers with fresh state.

    Shared by the API (check() before a request is queued) and the engine thread (matcher(), masks());
    the cache is guarded by a lock, and a matcher is owned by one sequence on the engine thread."""

    def __init__(self, backend_json: str, vocab_size: int, eos_token_ids: Sequence[int], *,
                 cache_size: int = 256, threads: int | None = None) -> None:  # fmt: skip
        # ~0.3 s for this vocabulary: once per server
        self.tokenizer = llguidance.LLTokenizer(
            backend_json, n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # masks are computed while the ranks' forward runs on the cores: take half of them at most
        self._executor = llguidance.LLExecutor(
            num_threads=threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        )
        self.compiled = 0  # cache misses, for tests and metrics

    def _template(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        matcher = llguidance.LLMatcher(self.tokenizer, lark_for(spec), log_level=0)
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        with self._lock:
            self._cache[spec] = matcher
            self.compiled += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def check(self, spec: GrammarSpec) -> None:
        """Compile (or find in the cache); raises GrammarError naming the problem."""
        self._template(spec)

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A matcher at the start of the grammar, for one sequence."""
        return self._template(spec).deep_copy()

    def masks(self, matchers: Sequence[llguidance.LLMatcher]) -> bytes:
        """The next-token bitmasks of these matchers, rows in order, as bytes for rank 0."""
        out = np.zeros((len(matchers), self.words), dtype=np.int32)
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], out)
        return out.tobytes()


def _first_line(message: str) -> str:
    # llguidance's errors carry a caret diagram after the first line; the first line names the problem
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return "the grammar does not compile"
    detail = [ln for ln in lines[1:] if ln.startswith("error:")]
    return " ".join([lines[0], *detail[:1]])
