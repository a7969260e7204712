"""The KV block pool's bookkeeping: which blocks are free, who holds each one, and how many times.

The pool tensors themselves live in the runner; this class only hands out block ids. A sequence's
block table is the list of its block ids in order; token i of the sequence lives in slot
`table[i // block_size] * block_size + i % block_size`. Blocks are reference-counted so that
several tables can share one (forked prompts; later, prefix caching): a block returns to the free
list when its last holder lets go.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks `table` needs to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens`; the caller checked `can_grow`."""
        for _ in range(self.blocks_needed(table, num_tokens)):
            block = self.free.popleft()
            self.ref_counts[block] = 1
            table.append(block)

    def fork(self, table: list[int]) -> list[int]:
        """A second table sharing every block of `table` (copy-free; both must `release`)."""
        for block in table:
            self.ref_counts[block] += 1
        return list(table)

    def release(self, table: list[int]) -> None:
        for block in table:
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released twice"
            if self.ref_counts[block] == 0:
                self.free.append(block)
        table.clear()
