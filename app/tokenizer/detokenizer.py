"""Streaming detokenization: ids in, only newly completed text out.

Decoding each token alone is wrong (byte-level tokens can hold part of a UTF-8 character, and
SentencePiece decoders strip a leading space) and decoding the whole output every step is O(n) per
token. As in vLLM and TGI we decode a small window: ``tokens[prefix:]``, where ``tokens[prefix:read]``
was already emitted and only gives the decoder its context; the text past it is new. The window slides
each time the decoded text ends on a whole character, so it stays a few tokens long. While it ends in
U+FFFD (an incomplete character, or invalid bytes that a later token may still complete) the text
before that tail is emitted and the tail is held. SentencePiece byte-fallback tokens are held while
they run: tokenizers decodes a run of them as a group, and one invalid byte turns the whole group
into U+FFFD, so text they make can still change until a normal token follows.
"""

from __future__ import annotations

from app.engine.types import TokenDecoder

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """One per output sequence; owned by the engine's output loop, never shared."""

    def __init__(self, tokenizer: TokenDecoder, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids[prefix:read] are context, already emitted
        self._read = 0
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._held = 0  # characters past prefix_text already emitted while the tail was incomplete

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", never half a character)."""
        if self._skip and self._tok.is_special(token_id):
            # Dropped here rather than inside the window: a window that starts with a skipped special
            # token would let a SentencePiece decoder strip the next token's leading space.
            return ""
        self._ids.append(token_id)
        if self._tok.is_byte_fallback(token_id):
            return ""
        text = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        start = len(self._prefix_text) + self._held
        if text.endswith(_REPLACEMENT):
            complete = len(text.rstrip(_REPLACEMENT))
            if complete <= start:
                return ""
            self._held += complete - start
            return text[start:complete]
        chunk = text[start:]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._tok.decode(
            self._ids[self._prefix : self._read], skip_special_tokens=self._skip
        )
        self._held = 0
        return chunk

    def flush(self) -> str:
        """The text still held back (a trailing incomplete character comes out as U+FFFD)."""
        text = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        chunk = text[len(self._prefix_text) + self._held :]
        self._prefix = self._read = len(self._ids)
        self._prefix_text, self._held = "", 0
        return chunk
