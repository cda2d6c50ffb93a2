"""app/layers/attention.py: the attention metadata a step builds once for every layer."""

from __future__ import annotations

import torch

from app.layers.attention import build_kernel_metadata


def test_kernel_metadata_names_each_rows_sequence_position_and_slot():
    """The per-row metadata of a ragged step (prefill chunks, decode rows, padding rows), against a
    row-by-row construction from the block tables."""
    block = 5
    query_lens, starts = [3, 1, 7, 1], [0, 12, 4, 0]
    tables = [(9, 2), (0, 4, 8), (1, 3, 6), (7,)]
    meta = build_kernel_metadata(query_lens, starts, tables, block, None, sum(query_lens) + 2)
    k = meta.kernel
    row = 0
    for i, (q, start, table) in enumerate(zip(query_lens, starts, tables, strict=True)):
        assert k.tables[i, : len(table)].tolist() == list(table) and not k.tables[i, len(table) :].any()
        for pos in range(start, start + q):
            assert (k.row_seq[row], k.row_len[row]) == (i, pos + 1)
            assert k.slots[row] == table[pos // block] * block + pos % block
            row += 1
    assert k.row_len[row:].tolist() == [0, 0] and k.slots[row:].tolist() == [-1, -1]
    assert torch.equal(meta.slot_mapping, k.slots[:row])
