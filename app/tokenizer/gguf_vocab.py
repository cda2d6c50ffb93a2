"""Build a ``tokenizers.Tokenizer`` from a GGUF file's metadata, the way llama.cpp reads it.

A GGUF carries no tokenizer.json: only the vocabulary, merges (or scores), token types and a
``tokenizer.ggml.pre`` name that selects llama.cpp's pre-tokenizer. llama.cpp splits text with a
list of regexes, each one splitting the pieces left by the previous (matches and the gaps between
them both become pieces); a chain of ``Split(behavior="isolated")`` pre-tokenizers is the same thing.
Only metadata is read here: tensor data is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (llama.cpp's regex list in order, ignore_merges), from llama-vocab.cpp
_PRE_TYPES: dict[str, tuple[tuple[str, ...], bool]] = {}
for _names, _splits, _ignore_merges in (
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    (("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe"), (_GPT2,), False),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        (r"\p{N}", _GPT2),
        False,
    ),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), (_LLAMA3,), True),
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), (_QWEN2,), False),
):
    for _name in _names:
        _PRE_TYPES[_name] = (_splits, _ignore_merges)

SUPPORTED_PRE_TYPES = tuple(sorted(_PRE_TYPES))
SUPPORTED_MODELS = ("gpt2", "llama")


class GGUFTokenizerError(ValueError):
    """The metadata describes a tokenizer we cannot build (the caller adds the file name)."""


@dataclass
class GGUFVocab:
    backend: Backend
    kind: str  # "byte_level" or "sentencepiece": how a token's text maps to bytes
    add_bos: bool


def read_metadata(reader: Any) -> dict[str, Any]:
    """The ``tokenizer.*`` and ``general.architecture`` values of an open ``gguf.GGUFReader``."""
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer.") or key == "general.architecture":
            out[key] = fld.contents()
    return out


def build(meta: dict[str, Any]) -> GGUFVocab:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFTokenizerError("no tokenizer.ggml.tokens in the metadata")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if model == "gpt2":
        vocab = _byte_level(meta, tokens)
    elif model == "llama":
        vocab = _sentencepiece(meta, tokens, types)
    else:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.model {model!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    # Control tokens are special (matched in text, dropped by skip_special_tokens); user-defined ones
    # are matched whole in text like llama.cpp does, but are ordinary text on output.
    roles = ("bos", "eos", "eot", "eom", "unknown", "padding")
    named = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in roles}
    special = [i for i, t in enumerate(types) if t == CONTROL or (i in named and t != NORMAL)]
    user = [i for i, t in enumerate(types) if t == USER_DEFINED]
    vocab.backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    vocab.backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    return vocab


def _byte_level(meta: dict[str, Any], tokens: list[str]) -> GGUFVocab:
    pre = meta.get("tokenizer.ggml.pre") or "default"  # llama.cpp's fallback for old files
    if pre not in _PRE_TYPES:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(SUPPORTED_PRE_TYPES)})"
        )
    splits, ignore_merges = _PRE_TYPES[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Backend(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    # llama.cpp adds BOS by default only for the llama3 family; the file's flag wins when present
    add_bos = meta.get("tokenizer.ggml.add_bos_token", ignore_merges)
    return GGUFVocab(backend, "byte_level", bool(add_bos))


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int]) -> GGUFVocab:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens), vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # As transformers' LlamaTokenizer: the prefix space goes before the first piece only.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return GGUFVocab(backend, "sentencepiece", bool(meta.get("tokenizer.ggml.add_bos_token", True)))


def _merges_from_scores(
    tokens: list[str], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    # SentencePiece merges the adjacent pair whose union scores highest; as a BPE merge list that is
    # every (left, right) split of a token into two vocabulary pieces, ranked by the token's score.
    # Ties go to the longer left piece, then file order, as transformers' GGUF converter does.
    ranked = []
    for index, (token, score) in enumerate(zip(tokens, scores, strict=True)):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -len(left), -len(right), index, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
