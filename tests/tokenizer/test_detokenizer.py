"""IncrementalDetokenizer: the streamed pieces add up to the one-shot decode, never show half a
character, and each step decodes only a few tokens."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from app.tokenizer.detokenizer import IncrementalDetokenizer
from app.tokenizer.tokenizer import Tokenizer
from tests.support.vocab import SPM_PIECES, write_vocab_gguf

TEXTS = [
    "Hello, world! Plain ASCII text with numbers 12345 and punctuation...",
    "日本語のテキストです。中文，标点！한국어 텍스트 ภาษาไทย العربية עברית",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 ❤️‍🔥 and 🧑🏿‍🚀 in a row: 😀😃😄😁😆😅😂🤣",
    "mixed: naïve café — “quotes” ‘single’ … ½ ² ٣٤٥ Ω≈ç√∫ µ≤≥÷",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\r\nCRLF",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n你好<|endoftext|>",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 and ancient 𓀀𓀁 glyphs, zero\u200bwidth",
]


class CountingTokenizer:
    """Records the window length of every decode call."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.windows: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.windows.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return self.tok.is_special(token_id)

    def is_byte_fallback(self, token_id: int) -> bool:
        return self.tok.is_byte_fallback(token_id)


@pytest.fixture(scope="module")
def tok(default_gguf_reader) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_reader)


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory) -> Tokenizer:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    write_vocab_gguf(
        path, tokens, types, tokenizer_model="llama", token_scores=scores, bos_token_id=1, eos_token_id=2
    )
    return Tokenizer.load(path)


def _stream(tok, ids: Sequence[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [detok.push(i) for i in ids] + [detok.flush()]


def _check(tok: Tokenizer, ids: Sequence[int]) -> None:
    for skip in (True, False):
        full = tok.decode(ids, skip_special_tokens=skip)
        chunks = _stream(tok, ids, skip)
        assert "".join(chunks) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in c for c in chunks)


def test_stream_equals_one_shot_decode(tok: Tokenizer, spm_tok: Tokenizer) -> None:
    for t in (tok, spm_tok):
        for text in TEXTS:
            ids = t.encode(text)
            assert len(ids) > 5
            _check(t, ids)


def test_partial_characters_are_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes span several byte-level tokens
    assert _stream(tok, ids, True) == [""] * (len(ids) - 1) + ["😀", ""]


def test_random_ids_including_invalid_utf8(tok: Tokenizer, spm_tok: Tokenizer) -> None:
    # Arbitrary id sequences: broken UTF-8, special tokens anywhere. The stream must still add up.
    rng = random.Random(1234)
    for t in (tok, spm_tok):
        partial = [i for i in range(t.vocab_size) if "\ufffd" in t.token_text(i)]
        specials = [i for i in range(t.vocab_size) if t.is_special(i)]
        assert partial and specials
        for _ in range(60):
            pool = rng.choice([partial, partial + specials, list(range(t.vocab_size))])
            _check(t, [rng.choice(pool) for _ in range(rng.randint(1, 40))])
        for text in TEXTS:  # real text cut at random points, with junk spliced in
            ids = t.encode(text)
            cut = rng.randrange(len(ids))
            _check(t, [*ids[:cut], rng.choice(partial), *ids[cut:]])


def test_decode_window_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode(" ".join(TEXTS) * 20)
    counting = CountingTokenizer(tok)
    chunks = _stream(counting, ids, True)
    assert "".join(chunks) == tok.decode(ids)
    assert len(ids) > 2000 and max(counting.windows) <= 8
    assert len(counting.windows) <= 2 * len(ids) + 1  # O(1) decodes of O(1) tokens per push


def test_skip_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHi!<|im_end|>")
    assert "".join(_stream(tok, ids, True)) == "assistant\nHi!"
    assert "".join(_stream(tok, ids, False)) == "<|im_start|>assistant\nHi!<|im_end|>"


def test_spm_leading_space_after_skipped_special(spm_tok: Tokenizer) -> None:
    # "<s>" then "▁hello": the one-shot decode strips only the very first space of the text
    ids = spm_tok.encode("the hello world")
    assert ids[0] == spm_tok.bos_token_id
    for skip in (True, False):
        assert "".join(_stream(spm_tok, ids, skip)) == spm_tok.decode(ids, skip_special_tokens=skip)
