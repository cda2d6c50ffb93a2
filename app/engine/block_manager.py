"""Paged KV cache bookkeeping: fixed-size blocks, ref counts, a free list and a prefix cache.

A block is in exactly one of three states:
  used    ref count > 0: in the block table of that many sequences
  cached  ref count 0 but holding the KV of a full block whose hash is registered: a later
          prompt with the same prefix can take it back; evicted least recently used first
  empty   ref count 0, no content anyone can ask for
"cached" and "empty" are both free for allocation (and for kv_cache_usage_ratio, as in vLLM);
empty blocks are handed out first so cached content lives as long as possible.

Prefix caching: a full block is named by sha256(name of the previous block + its token ids), so a
name stands for the whole prefix up to the block's end. A cryptographic hash because prompts come
from clients: with Python's (invertible) tuple hash a crafted prompt could collide with another
user's prefix and read their KV. Only full blocks are ever registered, and a sequence only writes
into the block holding position num_computed_tokens, which is never full, so a shared block is
never written. A block is registered when the step that fills it is planned; another sequence can
hit it in that same step, so the runner must write a step's KV (per layer) before attention reads it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from app.engine.sequence import Sequence


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Owned by the scheduler (the engine thread); not thread-safe by design."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives block 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently freed first
        self._cached: dict[bytes, int] = {}  # hash -> block, for every block whose hash is registered
        # Counted in tokens, as vLLM's prefix_cache_queries/hits: queries = prompt tokens looked up at
        # a sequence's first admission, hits = those served from the cache.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- stats ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: empty plus cached-but-unheld."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks still holding a registered prefix (kv_cache_blocks{state="cached"})."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one sequence (kv_cache_blocks{state="used"})."""
        return self.num_blocks - self.num_free_blocks

    @property
    def usage_ratio(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def free_block_ids(self) -> set[int]:
        """For tests and debugging: every block nobody holds."""
        return set(self._empty) | set(self._evictable)

    # ---- prefix cache ---------------------------------------------------------------------

    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq.block_hashes extended to cover its first num_blocks full blocks."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            tokens = array("q", seq.token_ids(i * bs, (i + 1) * bs)).tobytes()
            hashes.append(hashlib.sha256(parent + tokens).digest())
        return hashes

    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of seq's tokens; no side effects.

        At least one token is always left to compute (its logits are needed), so when the whole
        sequence is cached the last full block is not used and its tokens are recomputed.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in self._full_block_hashes(seq, max_blocks)[:max_blocks]:
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def reset_prefix_cache(self) -> None:
        """Forget every registered block, e.g. after a failed step left KV contents unknown."""
        for block in self._cached.values():
            self._hash[block] = None
        self._empty.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()

    # ---- allocation -----------------------------------------------------------------------

    def _take_block(self) -> int:
        if self._empty:
            block = self._empty.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            h = self._hash[block]
            assert h is not None
            del self._cached[h]
            self._hash[block] = None
        self._ref[block] = 1
        return block

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return _cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_table)

    def can_allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether allocate(seq, hits, num_new_tokens) would succeed."""
        total = _cdiv(len(hits) * self.block_size + num_new_tokens, self.block_size)
        revived = sum(1 for b in hits if self._ref[b] == 0)  # hits taken out of the free pool
        return total - len(hits) <= self.num_free_blocks - revived

    def allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int, count_query: bool = True) -> int:
        """Admit a sequence holding no blocks: take the cached prefix `hits` (from lookup) and room for
        num_new_tokens after it. Sets seq.num_computed_tokens to the cached tokens and returns them;
        advancing past the new tokens is the caller's job, as with append_slots."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "allocate() admits a bare sequence"
        for block in hits:
            if self._ref[block] == 0:
                del self._evictable[block]  # never hand out a block a hit is about to read
            self._ref[block] += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if count_query and self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens
        self.append_slots(seq, num_new_tokens)
        return seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to hold positions [num_computed_tokens, + num_new_tokens), and
        register the blocks those tokens fill. Does not advance num_computed_tokens."""
        need = self._blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"seq {seq.seq_id} needs {need} blocks, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._take_block())
        if not self.enable_prefix_caching:
            return
        first = seq.num_computed_tokens // self.block_size  # the first block not full before this step
        full = (seq.num_computed_tokens + num_new_tokens) // self.block_size
        hashes = self._full_block_hashes(seq, full)
        for i in range(first, full):
            block, h = seq.block_table[i], hashes[i]
            # Same content computed twice (e.g. two prompts admitted before either was cached): keep
            # the first copy registered; this one stays anonymous and goes back empty when freed.
            if self._hash[block] is None and h not in self._cached:
                self._hash[block] = h
                self._cached[h] = block

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks and reset num_computed_tokens (its KV is no longer held)."""
        # Reverse order: the prefix's first block becomes the most recently freed, so a prefix's tail
        # is evicted before its head (a tail block is useless without the blocks before it).
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            assert self._ref[block] >= 0, f"block {block} freed more often than taken"
            if self._ref[block] == 0:
                if self._hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._empty.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
