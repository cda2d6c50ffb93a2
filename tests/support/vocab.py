"""Tiny vocabularies written as GGUF files, for the tokenizer and detokenizer tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_vocab_gguf(path: Path, tokens: list[str], types: list[int], **kv) -> Path:
    """A GGUF file holding a vocabulary (and one tiny tensor): what tokenizer tests read."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in kv.items():
        getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_PIECES = ["▁", "▁t", "he", "▁the", "▁h", "el", "lo", "ello", "▁hello", "▁w", "or", "ld", "orld", "▁world"]
SPM_PIECES += ["▁▁", "e", "h", "l", "o", "t", "w", "r", "d", "a", "b", "c", "▁a", "ab", "abc", "中", "é", "!"]
SPM_PIECES += ["in", "ing", "▁th", "is", "▁is", "▁this", "s", "i", "n", "g", "<ctl>", "<think>"]
