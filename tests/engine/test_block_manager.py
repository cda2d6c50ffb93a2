"""BlockManager: allocation, growth, freeing, prefix sharing and LRU eviction (no torch, milliseconds)."""

from __future__ import annotations

import itertools

import pytest

from app.engine.block_manager import BlockManager
from app.engine.sequence import Sequence
from app.engine.types import SamplingParams

_ids = itertools.count()


def make_seq(prompt: list[int] | range) -> Sequence:
    return Sequence(next(_ids), f"req-{next(_ids)}", 0, tuple(prompt), SamplingParams())


def admit(bm: BlockManager, seq: Sequence, n: int | None = None) -> int:
    """What the scheduler does on admission: look up, allocate, advance past the computed chunk."""
    hits = bm.lookup(seq)
    n = seq.num_tokens - len(hits) * bm.block_size if n is None else n
    assert bm.can_allocate(seq, hits, n)
    cached = bm.allocate(seq, hits, n)
    seq.num_computed_tokens += n
    return cached


def grow(bm: BlockManager, seq: Sequence, n: int) -> None:
    assert bm.can_append(seq, n)
    bm.append_slots(seq, n)
    seq.num_computed_tokens += n


def test_allocate_append_free_counts_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(10))
    assert admit(bm, seq) == 0
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert (bm.num_used_blocks, bm.num_free_blocks) == (3, 5)
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)

    for tok in (10, 11, 12):  # decode: fills block 2 (positions 8..11) then needs block 3
        seq.append_token(tok)
        grow(bm, seq, 1)
    assert seq.num_computed_tokens == 13 and len(seq.block_table) == 4
    assert bm.usage_ratio == pytest.approx(4 / 8)

    table = list(seq.block_table)
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8
    assert bm.num_cached_free_blocks == 3  # the three full blocks stay reusable; the partial one does not
    assert all(bm.ref_count(b) == 0 for b in table)


def test_append_refuses_when_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(range(8))
    admit(bm, seq)
    assert not bm.can_append(seq, 1)
    with pytest.raises(RuntimeError):
        bm.append_slots(seq, 1)
    assert not bm.can_allocate(make_seq(range(100, 104)), [], 4)


def test_prefix_hit_shares_full_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(range(10))  # blocks [0..3], [4..7] full, [8, 9] partial
    admit(bm, a)
    b = make_seq([*range(8), 50, 51, 52])
    assert bm.lookup(b) == a.block_table[:2]
    assert admit(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]  # the partial last block is never shared
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    assert (bm.prefix_queries, bm.prefix_hits) == (10 + 11, 8)  # tokens, not blocks


def test_hit_needs_the_whole_chain_not_just_equal_block_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9])  # same second block, different first block
    assert bm.lookup(other) == []


def test_whole_prompt_cached_still_computes_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(range(8))
    admit(bm, a)
    bm.free(a)
    same = make_seq(range(8))  # block-aligned and fully cached: the last block is recomputed
    assert len(bm.lookup(same)) == 1
    assert admit(bm, same) == 4 and same.num_computed_tokens == 8
    longer = make_seq(range(9))
    assert len(bm.lookup(longer)) == 2  # only the 9th token is left to compute


def test_hit_on_unheld_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(range(8))
    admit(bm, a)
    first = a.block_table[0]
    bm.free(a)
    assert bm.num_cached_free_blocks == 2 and bm.num_free_blocks == 4
    b = make_seq([*range(4), 70, 71])
    hits = bm.lookup(b)
    assert hits == [first]
    admit(bm, b)
    assert bm.num_free_blocks == 2  # one empty block and a's cached second block
    assert bm.ref_count(hits[0]) == 1 and hits[0] not in bm.free_block_ids()
    # Taking both free blocks (evicting a's second block) must not hand out the block b reads.
    c = make_seq(range(200, 208))
    admit(bm, c)
    assert hits[0] not in c.block_table and set(c.block_table).isdisjoint(b.block_table)
    assert bm.num_free_blocks == 0


def test_eviction_is_lru_and_prefers_empty_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    old, new = make_seq([1, 2, 3, 4, 5]), make_seq([6, 7, 8, 9, 10])
    admit(bm, old)
    admit(bm, new)
    bm.free(old)  # freed first: least recently used
    bm.free(new)
    assert bm.num_cached_free_blocks == 4 and bm.num_free_blocks == 6
    # Needs 3 blocks: 2 empty ones first, then the least recently freed cached block, which is the
    # tail of `old` (blocks are freed tail first so a prefix's head outlives its tail).
    taker = make_seq([20, 21, 22, 23, 24, 25])
    admit(bm, taker)
    assert bm.num_cached_free_blocks == 3
    assert len(bm.lookup(make_seq([6, 7, 8, 9, 10]))) == 2  # `new` fully intact
    assert len(bm.lookup(make_seq([1, 2, 3, 4, 5]))) == 1  # `old` lost only its second block


def test_duplicate_content_keeps_first_copy_and_free_returns_the_other_empty():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(range(5)), make_seq(range(5))
    hits_b = bm.lookup(b)  # looked up before a is computed: both compute the same block
    admit(bm, a)
    bm.allocate(b, hits_b, 5)
    b.num_computed_tokens += 5
    assert b.block_table[0] != a.block_table[0]
    bm.free(b)
    assert bm.num_cached_free_blocks == 0  # b's copy was never registered
    bm.free(a)
    assert bm.num_cached_free_blocks == 1


def test_reset_prefix_cache_forgets_everything():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(9))
    admit(bm, a)
    held = make_seq(range(9))
    admit(bm, held)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_free_blocks == 0 and bm.lookup(make_seq(range(9))) == []
    bm.free(held)
    assert bm.num_free_blocks == 8 and bm.num_cached_free_blocks == 0


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq(range(9))
    admit(bm, a)
    bm.free(a)
    assert bm.lookup(make_seq(range(9))) == [] and bm.num_cached_free_blocks == 0
    assert (bm.prefix_queries, bm.prefix_hits) == (0, 0)
