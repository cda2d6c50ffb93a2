"""Text <-> token ids for a GGUF file or a Hugging Face model directory, and its chat template.

One ``Tokenizer`` per served model, built once at start-up and read-only afterwards (safe to share
between threads). It wraps a ``tokenizers.Tokenizer`` so encode/decode run in Rust, and it gathers
everything the rest of the server needs to know about the vocabulary: BOS policy, every id that
ends generation, the chat template(s), and the sampling defaults that start-up decides
(app/model/generation_config.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from app.model.gguf_file import read_gguf
from app.tokenizer import gguf_vocab
from app.tokenizer.chat_template import ChatTemplateError, compile_template, render_chat


class TokenizerError(ValueError):
    """No usable tokenizer at that path; the message names the file and the problem on one line."""


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte <-> printable character map, which byte-level vocabularies are spelled in
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """A vocabulary plus the facts about it; build with ``load``, ``from_gguf`` or ``from_hf_dir``."""

    def __init__(
        self,
        backend: Backend,
        *,
        kind: str,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        special_tokens: Mapping[str, str | None],
        chat_templates: Mapping[str, str],
        generation_defaults: Mapping[str, Any] | None = None,
        source: str = "",
    ) -> None:
        self._backend = backend
        self._kind = kind  # "byte_level", "sentencepiece" or "other": how a token's text maps to bytes
        self._bos = bos_token_id
        self._eos = tuple(dict.fromkeys(i for i in eos_token_ids if i is not None))
        self._pad = pad_token_id
        self._special_tokens = dict(special_tokens)  # bos_token, eos_token, ... for the templates
        self._templates = dict(chat_templates)
        # sampling defaults where a request is silent: app/model/generation_config.py decides them
        self.generation_defaults: dict[str, Any] = dict(generation_defaults or {})
        self.source = source
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._added_ids = frozenset(added)
        self._piece_cache: dict[int, bytes] = {}
        self._byte_pieces: frozenset[int] = frozenset()
        if kind == "sentencepiece":
            vocab = backend.get_vocab(with_added_tokens=False)
            self._byte_pieces = frozenset(i for t, i in vocab.items() if _BYTE_PIECE.fullmatch(t))

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def load(cls, model_path: str | os.PathLike, chat_template: str | None = None) -> Tokenizer:
        """The tokenizer of a ``.gguf`` file or a HF directory; ``chat_template`` (a file or a
        template string) replaces the model's template."""
        path = Path(model_path).expanduser()
        if path.is_dir():
            tok = cls.from_hf_dir(path)
        elif path.is_file():
            if path.suffix != ".gguf":
                raise TokenizerError(f"{path}: not a .gguf file or a model directory")
            tok = cls.from_gguf(path)
        else:
            raise TokenizerError(f"{path}: no such file or directory")
        if chat_template is not None:
            tok._templates = {"default": _read_template_arg(chat_template)}
        return tok

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | Any) -> Tokenizer:
        """Built from GGUF metadata alone; ``source`` is a path or an open ``gguf.GGUFReader``."""
        if isinstance(source, (str, os.PathLike)):
            name = str(source)
            try:
                fields = read_gguf(Path(name)).fields  # the fast header reader the loader shares
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{name}: cannot read GGUF metadata: {e}") from e
            meta = {
                k: v for k, v in fields.items() if k.startswith("tokenizer.") or k == "general.architecture"
            }
        else:
            name = str(getattr(source.data, "filename", None) or "<gguf>")
            meta = gguf_vocab.read_metadata(source)
        try:
            vocab = gguf_vocab.build(meta)
        except gguf_vocab.GGUFTokenizerError as e:
            raise TokenizerError(f"{name}: {e}") from e
        tokens = meta["tokenizer.ggml.tokens"]

        def ident(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}_token_id")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos, eos = ident("bos"), ident("eos")
        _set_bos_processor(vocab.backend, tokens[bos] if bos is not None else None, bos, vocab.add_bos)
        templates = {}
        if meta.get("tokenizer.chat_template"):
            templates["default"] = meta["tokenizer.chat_template"]
        for key, value in meta.items():  # named templates, e.g. tokenizer.chat_template.tool_use
            if key.startswith("tokenizer.chat_template.") and isinstance(value, str):
                templates[key.removeprefix("tokenizer.chat_template.")] = value
        return cls(
            vocab.backend,
            kind=vocab.kind,
            bos_token_id=bos,
            eos_token_ids=[eos, ident("eot"), ident("eom")],
            pad_token_id=ident("padding"),
            special_tokens={
                "bos_token": tokens[bos] if bos is not None else None,
                "eos_token": tokens[eos] if eos is not None else None,
                "unk_token": tokens[u] if (u := ident("unknown")) is not None else None,
                "pad_token": tokens[p] if (p := ident("padding")) is not None else None,
            },
            chat_templates=templates,
            source=name,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """From tokenizer.json, tokenizer_config.json, generation_config.json and chat_template.*"""
        root = Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{tj}: not found (a model directory needs a tokenizer.json)")
        try:
            backend = Backend.from_file(str(tj))
            decoder = json.loads(tj.read_text(encoding="utf-8")).get("decoder") or {}
        except Exception as e:  # the Rust side raises its own exception type
            raise TokenizerError(f"{tj}: cannot load: {e}".replace("\n", " ")) from e
        config = _read_json(root / "tokenizer_config.json")
        gen = _read_json(root / "generation_config.json")

        def token(name: str) -> str | None:
            value = config.get(name)
            return value.get("content") if isinstance(value, dict) else value

        names = {n: token(n) for n in ("bos_token", "eos_token", "unk_token", "pad_token")}
        ids = {n: backend.token_to_id(t) if t else None for n, t in names.items()}
        for name, tid in ids.items():  # as transformers: the named tokens are special
            if tid is not None and tid not in backend.get_added_tokens_decoder():
                backend.add_special_tokens([AddedToken(names[name], special=True, normalized=False)])
        # BOS/EOS insertion is tokenizer.json's post-processor alone: transformers ignores the
        # add_bos_token/add_eos_token flags of tokenizer_config.json when a tokenizer.json exists.
        gen_eos = gen.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        bos = ids["bos_token"] if ids["bos_token"] is not None else gen.get("bos_token_id")
        pad = ids["pad_token"] if ids["pad_token"] is not None else gen.get("pad_token_id")
        return cls(
            backend,
            kind=_decoder_kind(decoder),
            bos_token_id=bos,
            eos_token_ids=[ids["eos_token"], *gen_eos],
            pad_token_id=pad,
            special_tokens=names,
            chat_templates=_hf_templates(root, config),
            source=str(root),
        )

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (eos, eot, generation_config's list), primary first."""
        return self._eos

    @property
    def pad_token_id(self) -> int | None:
        return self._pad

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def is_byte_fallback(self, token_id: int) -> bool:
        """A SentencePiece ``<0xAB>`` token: its text depends on the byte tokens next to it."""
        return token_id in self._byte_pieces

    def backend_json(self) -> str:
        """The tokenizers-library JSON of this vocabulary (what llguidance builds its token trie from)."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; special tokens written in it are parsed as such, BOS added if the model says."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (OpenAI logprobs' ``bytes``)."""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._token_bytes(token_id)
            self._piece_cache[token_id] = piece
        return piece

    def token_text(self, token_id: int) -> str:
        """One token's text for logprobs: U+FFFD where the token holds part of a character."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _token_bytes(self, token_id: int) -> bytes:
        text = self._backend.id_to_token(token_id)
        if text is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if token_id in self._added_ids:
            return text.encode("utf-8")
        if self._kind == "byte_level":
            # a character outside GPT-2's byte alphabet (a mislabelled token) stands for itself
            return b"".join(
                bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode() for c in text
            )
        if self._kind == "sentencepiece":
            if _BYTE_PIECE.fullmatch(text):
                return bytes([int(text[3:5], 16)])
            return text.replace("▁", " ").encode("utf-8")
        return self._backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def config_info(self, max_model_len: int) -> dict[str, Any]:
        """What vLLM's /tokenizer_info serves: the tokenizer's configuration as tokenizer_config.json
        holds it (added tokens by their content, as vLLM flattens them), its class and chat template."""
        added = self._backend.get_added_tokens_decoder()
        info: dict[str, Any] = {k: v for k, v in self._special_tokens.items() if v is not None}
        info["added_tokens_decoder"] = {str(i): t.content for i, t in sorted(added.items())}
        info["model_max_length"] = max_model_len
        info["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.chat_template is not None:
            info["chat_template"] = self.chat_template
        return info

    # ---- chat ---------------------------------------------------------------------------------

    def template_knows_tools(self) -> bool:
        """Whether the chat template used with tools renders them itself (reads its `tools` variable)."""
        source = self._templates.get("tool_use") or self._templates.get("default")
        return source is not None and compile_template(source).knows_tools

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """The prompt text for a conversation (not tokenized), as transformers renders it."""
        if tools is not None and "tool_use" in self._templates:
            source = self._templates["tool_use"]
        elif "default" in self._templates:
            source = self._templates["default"]
        else:
            raise ChatTemplateError(f"{self.source}: the model has no chat template (use --chat-template)")
        return render_chat(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final_message,
            special_tokens=self._special_tokens,
            **extra,
        )


def _set_bos_processor(backend: Backend, bos: str | None, bos_id: int | None, add_bos: bool) -> None:
    if add_bos and bos is not None and bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")


def _decoder_kind(decoder: dict) -> str:
    parts = decoder.get("decoders") or [decoder]
    types = {p.get("type") for p in parts if isinstance(p, dict)}
    if "ByteLevel" in types:
        return "byte_level"
    if "ByteFallback" in types or "Metaspace" in types:
        return "sentencepiece"
    return "other"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _hf_templates(root: Path, config: dict) -> dict[str, str]:
    # Later sources win, as in transformers: tokenizer_config.json, chat_template.json, then the
    # standalone chat_template.jinja and additional_chat_templates/*.jinja of the newer layout.
    templates: dict[str, str] = {}
    for value in (config.get("chat_template"), _read_json(root / "chat_template.json").get("chat_template")):
        if isinstance(value, str):
            templates["default"] = value
        elif isinstance(value, list):
            templates.update({t["name"]: t["template"] for t in value if isinstance(t, dict)})
    if (root / "chat_template.jinja").is_file():
        templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    extra = root / "additional_chat_templates"
    if extra.is_dir():
        templates.update({f.stem: f.read_text(encoding="utf-8") for f in sorted(extra.glob("*.jinja"))})
    return templates


def _read_template_arg(value: str) -> str:
    """``--chat-template``: a file path, or the template itself; compiled now so errors show at start-up."""
    path = Path(value).expanduser()
    if "\n" not in value and len(value) < 4096 and path.is_file():
        source = path.read_text(encoding="utf-8")
        origin = str(path)
    elif "{{" in value or "{%" in value:
        source, origin = value, "--chat-template"
    else:
        raise TokenizerError(f"{value}: chat template file not found")
    try:
        compile_template(source)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"{origin}: {e}") from e
    return source
