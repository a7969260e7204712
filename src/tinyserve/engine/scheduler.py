"""Continuous batching: each step picks what to run under a token budget.

A step's batch mixes decodes (1 token per sequence) with prefill chunks, within
`max_num_batched_tokens` tokens and `max_num_seqs` sequences. Order of business:
  1. running sequences, decodes first (they are latency-critical and cost one token each), then
     the unfinished prefills, each taking a chunk of what budget is left;
  2. if nothing was preempted, admit waiting sequences first-come first-served while budget,
     sequence slots and free blocks last.
When a running sequence needs a block and none is free, the most recently arrived running sequence
that is not already in this step's batch is preempted: its blocks are freed and it goes back to the
front of the waiting queue to be recomputed later. Never failing for lack of memory is the point;
the engine guarantees one sequence of `max_len` always fits the pool, so progress is certain.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tinyserve.engine.sequence import Sequence, Status
from tinyserve.kv.block_manager import BlockManager


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
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
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
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed > 1):
            if budget == 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            if not self._make_room(seq, seq.num_computed + n, batch):
                continue
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            batch.add(seq, n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq.block_table, n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.blocks.grow(seq.block_table, n)
            batch.add(seq, n)
            budget -= n
        return batch

    def _make_room(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt latecomers until `seq` can hold `num_tokens`; False if `seq` itself had to go."""
        while not self.blocks.can_grow(seq.block_table, num_tokens):
            candidates = [s for s in self.running if s is not seq and s not in batch.seqs]
            victim = max(candidates, key=lambda s: s.arrival_time) if candidates else seq
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or aborted, or failed) sequence and give its blocks back at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
