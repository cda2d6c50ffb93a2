"""Checks a request needs the served model for: token ids inside the vocabulary, prompt and
max_tokens inside the context. The schemas (protocol.py) know nothing of the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from app.api.errors import ContextTooLong, InvalidRequest
from app.engine.types import SamplingParams


def check_against_model(
    params: SamplingParams,
    prompt_len: int,
    *,
    vocab_size: int,
    max_model_len: int,
    max_tokens_given: bool = True,
    prompt_token_ids: Sequence[int] = (),
    noun: str = "prompt",
) -> SamplingParams:
    """Check what needs the model; clip a defaulted max_tokens to the room left in the context.

    Like OpenAI, an explicit max_tokens that does not fit is an error, not silently shortened.
    noun is the parameter that holds the prompt ("prompt" or "messages").
    """
    if prompt_len <= 0:
        raise InvalidRequest(f"The {noun} is empty: there is nothing to complete.", param=noun)
    for param, ids in (
        ("prompt", prompt_token_ids),
        ("stop_token_ids", params.stop_token_ids),
        ("logit_bias", [t for t, _ in params.logit_bias]),
    ):
        if ids and max(ids) >= vocab_size:
            raise InvalidRequest(
                f"Token id {max(ids)} in {param} is outside the vocabulary (ids must be below {vocab_size}).",
                param=param,
            )
    if prompt_len >= max_model_len:
        raise ContextTooLong(max_model_len, prompt_len, noun=noun)
    room = max_model_len - prompt_len
    if params.max_tokens > room:
        if max_tokens_given:
            raise ContextTooLong(max_model_len, prompt_len, params.max_tokens, noun=noun)
        params = replace(params, max_tokens=room)
    if params.min_tokens > params.max_tokens:
        raise InvalidRequest(
            f"min_tokens ({params.min_tokens}) must not exceed max_tokens ({params.max_tokens}).",
            param="min_tokens",
        )
    return params
