"""app.tokenizer against transformers' tokenizers, for the default GGUF, a HF directory and small
GGUF files written here (SentencePiece vocabulary, other pre-tokenizer types, broken metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import regex
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from app.model.generation_config import sampling_defaults
from app.tokenizer import gguf_vocab
from app.tokenizer.chat_template import ChatTemplateError
from app.tokenizer.tokenizer import Tokenizer, TokenizerError
from tests.support.vocab import SPM_PIECES, write_vocab_gguf

# No digits here: see test_gguf_digits_follow_smollm_pre_tokenizer.
TEXTS = [
    "Hello world",
    "Hello, world! How's it going? I'll see, we've done it.",
    "  two leading spaces, three trailing   ",
    "tabs\t\tand\tnewlines\n\n\nand\r\nCRLF \n \t mixed",
    "héllo wörld ñandú Ærøskøbing façade",
    "日本語のテキストです。中文，标点！한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷 ❤️",
    "def f(x):\n    return x ** two  # square\n\nclass A:\n\tpass\n",
    '{"key": [true, null], "s": "a\\"b"} <div class="x">&amp;</div>',
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "<|im_start|> spaced <|im_end|>",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº–≠ œ∑´®†¥¨ˆøπ“‘",
    "Zero\u200bwidth\u00a0nbsp\u2028line sep\ufeffbom",
    "   ",
    "\n",
    "",
    "x" * 300,
]
DIGIT_TEXTS = [
    "12345",
    "Year 2024: 100% of 3.14159",
    "٣٤٥ and ٠١٢",
    "½ cup, ¾ inch, x² + y³",
    "１２３ full-width",
]
SMOLLM_PRE = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"]


@pytest.fixture(scope="module")
def ours(default_gguf_reader) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_reader)


@pytest.fixture(scope="module")
def reference(default_model_path: Path):
    return AutoTokenizer.from_pretrained(str(default_model_path.parent), gguf_file=default_model_path.name)


def test_gguf_encode_matches_transformers(ours: Tokenizer, reference) -> None:
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


def test_gguf_decode_matches_transformers_and_round_trips(ours: Tokenizer, reference) -> None:
    for text in TEXTS + DIGIT_TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            )


def _smollm_pieces(text: str) -> list[str]:
    # llama.cpp's definition: each regex splits the pieces the previous one left (matches and gaps)
    pieces = [text]
    for pattern in SMOLLM_PRE:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[pos : m.start()], m.group()] if m.start() > pos else [m.group()]
                pos = m.end()
            out += [piece[pos:]] if pos < len(piece) else []
        pieces = out
    return pieces


def test_gguf_digits_follow_smollm_pre_tokenizer(ours: Tokenizer, reference) -> None:
    # Known exception: transformers' GGUF converter ignores tokenizer.ggml.pre = "smollm" (it keeps
    # plain GPT-2 splitting), so for digits it is not the reference. The expected ids are the smollm
    # pre-tokenizer's own pieces (every \p{N} alone, then the GPT-2 regex), each BPE-encoded by
    # transformers; a single piece needs no further pre-tokenizing by it.
    for text in DIGIT_TEXTS:
        expected = [i for p in _smollm_pieces(text) for i in reference.encode(p, add_special_tokens=False)]
        assert ours.encode(text) == expected, text
    assert [ours.decode([i]) for i in ours.encode("12345")] == list("12345")
    assert ours.decode(ours.encode("٣٤٥")) == "٣٤٥"


def test_gguf_special_ids_and_flags(ours: Tokenizer, reference, default_gguf_reader) -> None:
    meta = {k: f.contents() for k, f in default_gguf_reader.fields.items() if k.startswith("tokenizer.ggml.")}
    assert ours.vocab_size == len(reference) == len(meta["tokenizer.ggml.tokens"])
    assert ours.bos_token_id == reference.bos_token_id == meta["tokenizer.ggml.bos_token_id"]
    assert ours.eos_token_ids == (reference.eos_token_id,) == (meta["tokenizer.ggml.eos_token_id"],)
    assert ours.pad_token_id == reference.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False and ours.encode("hi")[0] != ours.bos_token_id
    assert ours.chat_template == reference.chat_template
    control = [i for i, t in enumerate(meta["tokenizer.ggml.token_type"]) if t == gguf_vocab.CONTROL]
    assert all(ours.is_special(i) for i in control) and not ours.is_special(ours.encode("hello")[0])
    assert ours.encode("<|im_start|>") == [reference.convert_tokens_to_ids("<|im_start|>")]


def test_token_text_and_bytes(ours: Tokenizer, reference) -> None:
    for text in TEXTS + DIGIT_TEXTS:
        ids = ours.encode(text)
        assert b"".join(ours.token_bytes(i) for i in ids).decode("utf-8") == text
        for i in ids:
            assert ours.token_text(i) == reference.convert_tokens_to_string(
                [reference.convert_ids_to_tokens(i)]
            )
    # each token's own bytes, pieces of a character included (logprobs' `bytes`): the GGUF token's
    # spelling read back through transformers' GPT-2 byte map
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    partial = 0
    for i in ours.encode("🙂🚀✨ 日本語のテキスト。Русский", add_special_tokens=False):
        raw = bytes(byte_of[c] for c in reference.convert_ids_to_tokens(i))
        assert ours.token_bytes(i) == raw
        partial += "\ufffd" in ours.token_text(i)
    assert partial  # some tokens hold only part of a character


def test_hf_directory(tmp_path: Path, reference) -> None:
    reference.save_pretrained(tmp_path)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {  # SmolLM2's own tokenizer.json: digits one by one, then byte-level
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    gen = {"eos_token_id": [2, 0], "bos_token_id": 1, "temperature": 0.2, "top_p": 0.9, "top_k": 40}
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.load(tmp_path)
    for text in TEXTS + DIGIT_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert set(ours.eos_token_ids) == {ref.eos_token_id, 2, 0} and ours.eos_token_ids[0] == ref.eos_token_id
    assert ours.bos_token_id == ref.bos_token_id and ours.pad_token_id == ref.pad_token_id
    # the sampling defaults are read by app/model/generation_config.py, the one owner of them
    assert sampling_defaults("auto", {}, tmp_path)[0] == {"temperature": 0.2, "top_p": 0.9, "top_k": 40}
    assert ours.chat_template == ref.chat_template is not None
    # the newer layout: a chat_template.jinja beside tokenizer.json wins
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


def test_hf_directory_bos_comes_from_tokenizer_json(tmp_path: Path, reference) -> None:
    # As in Llama 3's tokenizer.json: the post-processor adds BOS. transformers obeys it, and ignores
    # tokenizer_config's add_bos_token when a tokenizer.json exists (so the flag here changes nothing).
    reference.save_pretrained(tmp_path)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.load(tmp_path)
    for text in ("hello", "", "<|im_start|>x"):
        assert ours.encode(text) == ref.encode(text) and ours.encode(text)[0] == ours.bos_token_id == 1
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [gguf_vocab.UNKNOWN, gguf_vocab.CONTROL, gguf_vocab.CONTROL]
    types += [gguf_vocab.BYTE] * 256 + [gguf_vocab.NORMAL] * len(SPM_PIECES)
    types[tokens.index("<ctl>")], types[tokens.index("<think>")] = (
        gguf_vocab.CONTROL,
        gguf_vocab.USER_DEFINED,
    )
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    return write_vocab_gguf(
        path, tokens, types, tokenizer_model="llama", token_scores=scores, bos_token_id=1, eos_token_id=2,
        unk_token_id=0, chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )  # fmt: skip


def test_sentencepiece_gguf_matches_transformers(spm_gguf: Path) -> None:
    ours = Tokenizer.load(spm_gguf)
    ref = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    texts = ["hello world", "  hello  world ", "this is the thing!", "中文 é ü 😀 ∑", "<s>hello</s>", " ", ""]
    texts += ["abc<ctl>the<think>hello", "x\ny\tz"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.encode("hi")[0] == ours.bos_token_id == 1 and ours.eos_token_ids == (2,)
    assert b"".join(ours.token_bytes(i) for i in ours.encode("hello é 😀", add_special_tokens=False)) == (
        " hello é 😀".encode()  # the SentencePiece prefix space is part of the first piece
    )


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_other_pre_tokenizers_match_transformers(pre: str, default_gguf_reader) -> None:
    # transformers' GGUF converter does apply these pre-types; SmolLM2's vocabulary stands in.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    meta = gguf_vocab.read_metadata(default_gguf_reader)
    meta["tokenizer.ggml.pre"] = pre
    ours = gguf_vocab.build(meta).backend
    keys = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "merges": "merges"}
    ref, _ = convert_gguf_tokenizer(
        "llama", {v: meta[f"tokenizer.ggml.{k}"] for k, v in keys.items()} | {"token_type": [1] * 49152}
    )
    for text in TEXTS + DIGIT_TEXTS:
        text = text.replace("<|", "< |")  # both sides' special tokens are out of this comparison
        assert ours.encode(text).ids == ref.encode(text, add_special_tokens=False).ids, (pre, text)


def test_errors_are_one_line_and_name_the_file(tmp_path: Path, spm_gguf: Path) -> None:
    cases = {
        tmp_path / "nothing-here": "no such file",
        tmp_path: "tokenizer.json",
        write_vocab_gguf(
            tmp_path / "bpe.gguf", ["a", "b"], [1, 1], tokenizer_model="gpt2", tokenizer_pre="bogus"
        ): "smollm",
        write_vocab_gguf(tmp_path / "wp.gguf", ["a", "b"], [1, 1], tokenizer_model="bert"): "gpt2, llama",
    }
    (tmp_path / "notes.txt").write_text("x")
    cases[tmp_path / "notes.txt"] = "not a .gguf"
    for path, needle in cases.items():
        with pytest.raises(TokenizerError) as e:
            Tokenizer.load(path)
        assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TokenizerError, match="bogus"):
        Tokenizer.load(tmp_path / "bpe.gguf")
    with pytest.raises(TokenizerError, match="chat template file not found"):
        Tokenizer.load(spm_gguf, chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatTemplateError, match="line 1"):
        Tokenizer.load(spm_gguf, chat_template="{% for m in messages %}")


def test_chat_template_override(tmp_path: Path, spm_gguf: Path) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert Tokenizer.load(spm_gguf).apply_chat_template(msgs) == "<s>hi"
    (tmp_path / "t.jinja").write_text("[{{ messages[0]['role'] }}]{{ eos_token }}")
    assert (
        Tokenizer.load(spm_gguf, chat_template=str(tmp_path / "t.jinja")).apply_chat_template(msgs)
        == "[user]</s>"
    )
    assert Tokenizer.load(spm_gguf, chat_template="{{ bos_token }}!").apply_chat_template(msgs) == "<s>!"
