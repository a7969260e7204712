"""The KV block pool's bookkeeping: which blocks are free, who holds each one, and which prefix each
cached block holds.

The pool tensors themselves live in the runner; this class only hands out block ids. A sequence's
block table is the list of its block ids in order; token i of the sequence lives in slot
`table[i // block_size] * block_size + i % block_size`.

Prefix caching (vLLM's automatic prefix caching, in its shape):
- A block full of computed tokens is registered under its identity (kv/block_hash.py). A new
  sequence takes every cached leading block of its prompt instead of recomputing it.
- Blocks are reference-counted: a block held by running sequences is never handed out again, and it
  is never written either, because a sequence only writes the slots of its own uncomputed tokens,
  which lie in blocks allocated to it alone (cached blocks are full).
- A block whose last holder lets go joins the free list *and keeps its contents and identity*; it is
  evicted (its identity forgotten) only when it is handed out as a fresh block. The free list is in
  LRU order, and a table is released tail first, so a sequence's last blocks go before the prefix
  that others are likelier to share, and a child block before its parent.
Free cached blocks count as free: `num_free` and `usage` see only what running sequences hold.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tinyserve.kv.block_hash import BlockHash


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the cache and found there (vLLM's `prefix_cache_queries`/`_hits`)."""

    queries: int = 0
    hits: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Every block with no holder, least recently used first (an OrderedDict as a set with O(1)
        # removal from the middle, for a cached block that is taken again).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks findable by their prefix (held or free)."""
        return len(self.cached)

    # -- fresh blocks ---------------------------------------------------------------------------
    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks `table` needs to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append fresh blocks to `table` until it holds `num_tokens`; the caller checked `can_grow`.
        A fresh block is the least recently used free one; if it was cached, that entry is evicted."""
        for _ in range(self.blocks_needed(table, num_tokens)):
            block, _ = self.free.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            table.append(block)

    # -- cached prefixes ------------------------------------------------------------------------
    def match(self, hashes: list[BlockHash]) -> list[int]:
        """The cached blocks of the longest leading run of `hashes` (a sequence's full blocks in order)."""
        hits = []
        if self.enable_caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                hits.append(block)
        return hits

    def can_take(self, hits: list[int], num_tokens: int) -> bool:
        """Whether an empty table can take `hits` and then grow to `num_tokens`: hits nobody holds
        leave the free list, so they cost free blocks too."""
        idle_hits = sum(1 for b in hits if self.ref_counts[b] == 0)
        return idle_hits + self.blocks_needed(hits, num_tokens) <= self.num_free

    def take(self, table: list[int], hits: list[int]) -> None:
        """Share the cached `hits` into the empty `table` (the caller checked `can_take`)."""
        assert not table, "cached blocks start a table"
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            table.append(block)

    def register(self, table: list[int], hashes: list[BlockHash], first: int, end: int) -> None:
        """Make `table`'s blocks [first, end), now full of computed tokens, findable by `hashes`.
        A prefix already cached in another block (two sequences computed it at once) keeps that
        block; this one stays anonymous and is recycled as a plain block."""
        if not self.enable_caching:
            return
        for i in range(first, end):
            block, h = table[i], hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block

    def record_lookup(self, num_queried: int, num_hit: int) -> None:
        self.stats.queries += num_queried
        self.stats.hits += num_hit

    # -- release --------------------------------------------------------------------------------
    def release(self, table: list[int], keep_cached: bool = True) -> None:
        """Let go of every block of `table`, tail first. `keep_cached=False` (a sequence that failed:
        its K/V may be garbage) forgets the identity of each block that nobody else holds."""
        for block in reversed(table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released twice"
            if self.ref_counts[block] == 0:
                if not keep_cached:
                    self._forget(block)
                self.free[block] = None  # most recently used end
        table.clear()

    def truncate(self, table: list[int], num_tokens: int) -> None:
        """Give back `table`'s blocks beyond those `num_tokens` tokens need (a speculative step's
        rejected drafts). They were never registered (only computed full blocks are), hold nothing
        worth keeping, and go to the front of the free list, to be handed out first."""
        keep = -(-num_tokens // self.block_size)
        while len(table) > keep:
            block = table.pop()
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] == 0 and self.block_hash[block] is None, "a tail block is never shared"
            self.free[block] = None
            self.free.move_to_end(block, last=False)

    def _forget(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None
