"""Scheduling policies: who is admitted first, whose prefill chunk goes first, and who is preempted.

A policy is one ordering key over sequences (smaller = served sooner). The scheduler admits waiting
sequences and feeds running prefills in key order, and preempts the running sequence with the
largest key, so preemption always follows the policy.
- `fcfs`: arrival order (vLLM's default).
- `priority`: the request's `priority` (lower first, vLLM's convention), then arrival.
- `shortest`: shortest remaining prompt first, which cuts the queueing time of short requests
  stuck behind long documents. Aging keeps it from starving the long ones: every second a sequence
  has waited takes `aging_tokens_per_s` tokens off its key, so a prompt of L tokens overtakes any
  newcomer after at most L / aging_tokens_per_s seconds.
"""

from __future__ import annotations

from collections.abc import Callable

from tinyserve.config import SCHEDULING_POLICIES
from tinyserve.engine.sequence import Sequence

Key = Callable[[Sequence, float], tuple[float, ...]]


class SchedulingPolicy:
    def __init__(self, name: str, aging_tokens_per_s: float = 1000.0) -> None:
        if name not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; got {name!r}")
        self.name = name
        self.aging = aging_tokens_per_s
        self.key: Key = {"fcfs": self._fcfs, "priority": self._priority, "shortest": self._shortest}[name]

    @property
    def uses_priority(self) -> bool:
        return self.name == "priority"

    @staticmethod
    def _fcfs(seq: Sequence, now: float) -> tuple[float, ...]:
        return (seq.arrival_time,)

    @staticmethod
    def _priority(seq: Sequence, now: float) -> tuple[float, ...]:
        return (seq.priority, seq.arrival_time)

    def _shortest(self, seq: Sequence, now: float) -> tuple[float, ...]:
        remaining = max(0, seq.num_prompt_tokens - seq.num_computed)
        return (remaining - self.aging * (now - seq.arrival_time), seq.arrival_time)

    def order(self, seqs: list[Sequence], now: float) -> list[Sequence]:
        return sorted(seqs, key=lambda s: self.key(s, now))

    def victim(self, seqs: list[Sequence], now: float) -> Sequence:
        """The sequence to preempt first: the one the policy would serve last."""
        return max(seqs, key=lambda s: self.key(s, now))
