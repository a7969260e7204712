"""Continuous batching: each step picks what to run under a token budget.

A step's batch mixes decodes (1 token per sequence) with prefill chunks, within
`max_num_batched_tokens` tokens and `max_num_seqs` sequences. Order of business:
  1. the running decodes (latency-critical, one token each, plus the drafts of a speculating one:
     drafts take only the budget and the free blocks that no real token needs, and never preempt);
  2. prefill chunks, in the policy's order (engine/policy.py) over running prefills and waiting
     sequences together, each taking a chunk of what budget is left. A waiting sequence is admitted
     only if nothing was preempted this step and a sequence slot and the blocks are free; it first
     takes the cached blocks of its prompt's longest cached prefix (kv/block_manager.py), so its
     prefill starts after them. Under fcfs this is "running prefills, then admissions in arrival order".
With `prefill_chunk` (the batch-invariant mode) every prefill is cut at the same positions whatever
else runs: a chunk is that many tokens (or the prompt's rest) and waits for a step with room for it
whole, so a prompt's computation never depends on its neighbours.
When a running sequence needs a block and none is free, the running sequence the policy ranks last
that is not already in this step's batch is preempted: its blocks are freed (they stay cached) and
it waits again. Under `preemption_mode="swap"` its K/V is first copied to the swap space and copied
back into fresh blocks when it is admitted again, so it resumes where it stopped; otherwise (or when
the swap space is full, or when recomputing its tokens measures cheaper than the copies: `_swap_pays`)
it is recomputed from its tokens. Never failing for lack of memory is the
point; the engine guarantees one sequence of `max_len` always fits the pool, so progress is certain.
With a disk tier (kv/tiers.py), an admitted prompt's prefix continues past the pool's cached blocks
with the blocks found on disk, loaded into fresh blocks instead of prefilled, and every block the
prefix cache registers is offered to the disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinyserve.engine.policy import SchedulingPolicy
from tinyserve.engine.sequence import Sequence, Status
from tinyserve.kv.block_manager import BlockManager
from tinyserve.kv.tiers import KVTiers


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full: the caller should retry later (HTTP 503)."""


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens fed for each sequence this step
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int,
                 policy: SchedulingPolicy | None = None, clock: Callable[[], float] = time.monotonic,
                 prefill_chunk: int | None = None, tiers: KVTiers | None = None, swap: bool = False) -> None:
        self.blocks = blocks
        self.tiers = tiers
        self.swap = swap and tiers is not None  # preempt by swapping out, not by recomputing
        self.always_swap = False  # swap whatever the costs (batch invariance: a recomputed prefix rounds differently)
        self.prefill_seconds_per_token: float | None = None  # measured by the engine on its prefill steps
        self.prefill_chunk = prefill_chunk
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.policy = policy or SchedulingPolicy("fcfs")
        self.clock = clock  # the policies' "now" (waiting times); sequences' arrival_time is on the same clock
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seqs: list[Sequence]) -> None:
        if len(self.waiting) + len(seqs) > self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({len(self.waiting)} of {self.max_waiting}); retry later")
        self.waiting.extend(seqs)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        now = self.clock()
        # Decodes first: they are latency-critical and cost one token each.
        decodes = [s for s in self.running if s.num_uncomputed == 1]
        spare = max(0, budget - len(decodes))  # what drafts may take: every decode keeps its own token
        for seq in decodes:
            left = self._feed(seq, budget, batch, now, spare)
            spare -= max(0, budget - left - 1)
            budget = left
        # Then prefill chunks, running and waiting alike, in policy order: a short newcomer can go
        # ahead of a long document's next chunk when the policy ranks it first.
        prefills = [s for s in self.running if s.num_uncomputed > 1]
        admitting = bool(self.waiting) and len(self.running) < self.max_num_seqs  # else no need to rank them
        for seq in self.policy.order(prefills + self.waiting if admitting else prefills, now):
            if budget == 0:
                break
            if seq.status == Status.RUNNING:
                budget = self._feed(seq, budget, batch, now)
            elif admitting and not batch.preempted and len(self.running) < self.max_num_seqs:
                # Nobody overtakes a waiting sequence that does not fit (no starvation by size).
                admitting = self._admit(seq, budget, batch)
                budget -= batch.num_tokens[-1] if admitting else 0
        return batch

    def _feed(self, seq: Sequence, budget: int, batch: ScheduledBatch, now: float, spare: int = 0) -> int:
        """Schedule a running sequence's next tokens (all, or a chunk of what budget is left), then as
        many of its drafts as `spare` budget and free blocks allow; the budget left."""
        if seq.status != Status.RUNNING:  # preempted earlier in this step
            return budget
        n = self._chunk(seq.num_uncomputed, budget)
        if n == 0 or not self._make_room(seq, seq.num_computed + n, batch, now):
            return budget
        drafts = seq.spec_token_ids
        if drafts:
            keep = min(len(drafts), spare)
            while keep and not self.blocks.can_grow(seq.block_table, seq.num_computed + n + keep):
                keep -= 1
            del drafts[keep:]
            n += keep
        self.blocks.grow(seq.block_table, seq.num_computed + n)
        batch.add(seq, n)
        return budget - n

    def _admit(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> bool:
        """Start `seq` on what it can reuse (its swapped-out K/V, or its prompt's cached prefix: the
        pool's blocks, then the disk's) plus a chunk of at most `budget` tokens, if the pool has room."""
        if self.tiers is not None and self.tiers.is_swapped(seq):
            return self._resume(seq, budget, batch)
        # The last token is always computed, for its logits; prompt logprobs need every position.
        bs = self.blocks.block_size
        cacheable = self.blocks.enable_caching and seq.params.prompt_logprobs is None
        hashes = seq.full_block_hashes(bs, seq.num_tokens - 1) if cacheable else []
        hits = self.blocks.match(hashes)
        on_disk = self.tiers.on_disk(hashes[len(hits):]) if self.tiers is not None and hashes else 0
        num_cached = (len(hits) + on_disk) * bs
        n = self._chunk(seq.num_tokens - num_cached, budget)
        if n == 0 or not self.blocks.can_take(hits, num_cached + n):
            return False
        self._start(seq, batch, n)
        self.blocks.take(seq.block_table, hits)
        self.blocks.grow(seq.block_table, num_cached + n)
        if on_disk:
            assert self.tiers is not None
            first = len(hits)
            loaded = self.tiers.load(hashes[first:first + on_disk], seq.block_table[first:first + on_disk])
            # A block that failed to load (evicted by a replica, corrupt) is computed instead: the chunk
            # starts there and is as long as planned, within the blocks just grown.
            self.blocks.register(seq.block_table, hashes, first, first + loaded)
            num_cached = (first + loaded) * bs
        seq.num_computed = num_cached
        if seq.num_cached_tokens is None:  # the first admission: what the request is told it reused
            seq.num_cached_tokens = num_cached
            if cacheable:
                self.blocks.record_lookup(seq.num_tokens, num_cached)
        return True

    def _resume(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> bool:
        """Admit a swapped-out sequence again: fresh blocks, its K/V copied back, and its next tokens."""
        assert self.tiers is not None
        n = self._chunk(seq.num_uncomputed, budget)
        if n == 0 or not self.blocks.can_grow([], seq.num_computed + n):
            return False
        self._start(seq, batch, n)
        self.blocks.grow(seq.block_table, seq.num_computed + n)
        self.tiers.swap_in(seq, seq.block_table[: self.tiers.swapped_blocks(seq)])
        return True

    def _start(self, seq: Sequence, batch: ScheduledBatch, n: int) -> None:
        self.waiting.remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        batch.add(seq, n)

    def _chunk(self, uncomputed: int, budget: int) -> int:
        """Tokens to feed now: what budget allows, or with a fixed prefill chunk the next whole chunk or
        nothing (a decode's single token is a chunk of one)."""
        if self.prefill_chunk is None:
            return min(uncomputed, budget)
        n = min(uncomputed, self.prefill_chunk)
        return n if n <= budget else 0

    def _make_room(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch, now: float) -> bool:
        """Preempt the policy's last until `seq` can hold `num_tokens`; False if `seq` itself had to go."""
        while not self.blocks.can_grow(seq.block_table, num_tokens):
            candidates = [s for s in self.running if s is not seq and s not in batch.seqs]
            victim = self.policy.victim(candidates, now) if candidates else seq
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.spec_token_ids = []
        # Its table covers its computed tokens (a victim is not in this step's batch, so nothing was
        # grown for it); swapped, it keeps num_computed, else it starts over.
        assert self.tiers is None or not self.tiers.is_swapped(seq)
        computed_blocks = seq.block_table[: -(-seq.num_computed // self.blocks.block_size)]
        swap = self.tiers if self.swap and computed_blocks and self._swap_pays(seq, len(computed_blocks)) else None
        if not (swap is not None and swap.swap_out(seq, computed_blocks)):
            seq.num_computed = 0
        self.blocks.release(seq.block_table)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.insert(0, seq)

    def _swap_pays(self, seq: Sequence, blocks: int) -> bool:
        """Swap unless recomputing measures cheaper: the copies' seconds per block (out and back in)
        against the prefill's seconds per token, both measured on this engine's own steps, for this
        sequence's blocks and tokens. Until both are measured, swap (on a CPU the copy is a memcpy, far
        cheaper: REPORT K2; over a GPU's PCIe link a short prefix can be cheaper to recompute)."""
        assert self.tiers is not None
        per_block = self.tiers.swap_seconds_per_block()
        if self.always_swap or per_block is None or self.prefill_seconds_per_token is None:
            return True
        if blocks * per_block <= seq.num_computed * self.prefill_seconds_per_token:
            return True
        self.tiers.stats.swap_declined += 1
        return False

    def computed(self, seq: Sequence, n: int) -> None:
        """`seq`'s last `n` fed tokens now have their K/V: blocks they filled become findable."""
        bs = self.blocks.block_size
        first, seq.num_computed = seq.num_computed // bs, seq.num_computed + n
        end = seq.num_computed // bs
        if end > first and self.blocks.enable_caching:
            hashes = seq.full_block_hashes(bs, seq.num_computed)
            self.blocks.register(seq.block_table, hashes, first, end)
            if self.tiers is not None and seq.params.prompt_logprobs is None:
                self.tiers.offload(hashes[first:end], seq.block_table[first:end])

    def rolled_back(self, seq: Sequence) -> None:
        """After speculation: give back the blocks beyond the sequence's tokens (rejected drafts' slots)."""
        self.blocks.truncate(seq.block_table, seq.num_tokens)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or aborted, or failed) sequence and give its blocks back at once; a failed
        sequence's blocks are not kept findable (its K/V may be what failed)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.tiers is not None:
            self.tiers.drop(seq)
        self.blocks.release(seq.block_table, keep_cached=seq.finish_reason != "error")
