"""Scheduling policies: who is admitted first, whose prefill chunk goes first, and who is preempted.

A policy is one ordering key over sequences (smaller = served sooner), registered by the name
`--scheduling-policy` takes. The scheduler admits waiting sequences and feeds running prefills in key
order, and preempts the running sequence with the largest key, so preemption always follows the policy.
`shortest` cuts the queueing time of short requests stuck behind long documents; aging keeps it from
starving the long ones: every second a sequence has waited takes `aging_tokens_per_s` tokens off its
key, so a prompt of L tokens overtakes any newcomer after at most L / aging_tokens_per_s seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tinyserve.registry import Registry

if TYPE_CHECKING:
    from tinyserve.engine.sequence import Sequence

Key = Callable[["Sequence", float, float], tuple[float, ...]]  # (sequence, now, aging tokens/s) -> rank
POLICIES: Registry[Key] = Registry("scheduling_policy")


@POLICIES.register("fcfs")
def _fcfs(seq: Sequence, now: float, aging: float) -> tuple[float, ...]:
    """arrival order (vLLM's default)"""
    return (seq.arrival_time,)


@POLICIES.register("priority")
def _priority(seq: Sequence, now: float, aging: float) -> tuple[float, ...]:
    """each request's priority, lower first (vLLM's convention), then arrival"""
    return (seq.priority, seq.arrival_time)


@POLICIES.register("shortest")
def _shortest(seq: Sequence, now: float, aging: float) -> tuple[float, ...]:
    """shortest remaining prompt first, aged by --aging-tokens-per-s so that nothing starves"""
    remaining = max(0, seq.num_prompt_tokens - seq.num_computed)
    return (remaining - aging * (now - seq.arrival_time), seq.arrival_time)


class SchedulingPolicy:
    def __init__(self, name: str, aging_tokens_per_s: float = 1000.0) -> None:
        self.key = POLICIES[name]  # an unknown name fails here, naming the knob
        self.name = name
        self.aging = aging_tokens_per_s

    @property
    def uses_priority(self) -> bool:
        return self.name == "priority"

    def order(self, seqs: list[Sequence], now: float) -> list[Sequence]:
        return sorted(seqs, key=lambda s: self.key(s, now, self.aging))

    def victim(self, seqs: list[Sequence], now: float) -> Sequence:
        """The sequence to preempt first: the one the policy would serve last."""
        return max(seqs, key=lambda s: self.key(s, now, self.aging))
