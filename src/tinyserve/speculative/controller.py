"""How many tokens to draft this step: the k that maximizes expected tokens per second, from each
sequence's measured acceptance and the measured price of the step (speculative/cost.py).

With per-token acceptance rate a, k drafts emit (1 - a^(k+1)) / (1 - a) tokens on average (the
accepted run plus the target's own token; Leviathan et al. 2023). A step of B decodes drafting k
each costs one target forward over B (k + 1) rows plus k draft-model steps: the first over the one
or two tokens each sequence's draft has not seen (two when the last verification accepted every
draft: the last draft and the bonus token), then k - 1 over B rows. The
controller picks the k in 0..K with the most tokens per second, so it stops drafting by itself
when acceptance is low, when the draft is slow, or when the batch is large enough that k more rows
per sequence cost more than they return. Switched off for low acceptance, it probes every
PROBE_EVERY steps to see whether the text has turned predictable (not when the batch alone rules
speculation out), with the k that would pay best were every draft accepted: one probe then moves
the estimate as far as k drafts can. A sequence's rate is estimated from its own verifications,
decayed so that it follows the text, starting from the rate pooled over recent verifications of
every sequence (the workload's), so a new sequence of a predictable workload drafts from its first
step instead of climbing from a fixed prior one probe at a time.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from tinyserve.speculative.cost import StepCost

PRIOR_RATE, PRIOR_WEIGHT = 0.5, 2.0  # the pooled rate's start; a new sequence's prior is worth two drafts
DECAY = 0.8  # per verification of the sequence
POOLED_DECAY = 0.95  # per verification of any sequence: the pooled rate follows the workload, slower
PROBE_EVERY = 16
MIN_GAIN = 1.02  # speculate only for at least 2% more tokens per second than plain decoding


@dataclass
class _Acceptance:
    accepted: float = PRIOR_RATE * PRIOR_WEIGHT
    tested: float = PRIOR_WEIGHT

    @property
    def rate(self) -> float:
        return self.accepted / self.tested


def expected_tokens(a: float, k: int) -> float:
    """Tokens a verification of k drafts emits when each is accepted with probability a."""
    return k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


class DraftPolicy:
    """The draft length per step; `adaptive=False` always drafts `k_max`."""

    def __init__(self, k_max: int, adaptive: bool, target: StepCost | None = None,
                 draft: StepCost | None = None) -> None:
        self.k_max = k_max
        self.adaptive = adaptive
        self.target = target
        self.draft = draft  # None: drafting costs nothing worth counting (n-gram lookup)
        self._seqs: dict[object, _Acceptance] = {}
        self._pooled = _Acceptance()
        self._off_steps = 0

    def rate(self, seq: object) -> float:
        return self._acceptance(seq).rate

    def _acceptance(self, seq: object) -> _Acceptance:
        acc = self._seqs.get(seq)
        if acc is None:
            acc = self._seqs[seq] = _Acceptance(self._pooled.rate * PRIOR_WEIGHT, PRIOR_WEIGHT)
        return acc

    def choose(self, seqs: list[object]) -> int:
        """k for a step in which `seqs` decode."""
        if not self.adaptive or self.target is None:
            return self.k_max
        k = self.best_k([self.rate(s) for s in seqs])
        # Off: probe now and then, unless even perfect acceptance could not pay at this batch size
        # (then the cost decides, not the rates, and a probe would only cost: a draft model that
        # has been idle first catches up on every token it missed).
        probe = self.best_k([1.0] * len(seqs)) if k == 0 else 0
        if probe > 0:
            self._off_steps += 1
            if self._off_steps >= PROBE_EVERY:
                self._off_steps = 0
                return probe
        return k

    def best_k(self, rates: list[float]) -> int:
        assert self.target is not None
        b = len(rates)
        plain = b / self.target(b)
        best_k, best = 0, plain * MIN_GAIN
        for k in range(1, self.k_max + 1):
            seconds = self.target(b * (k + 1))
            if self.draft is not None:
                catch_up = sum(1.0 + a**k for a in rates)  # P(all k accepted) = a^k: two tokens unseen
                seconds += self.draft(round(catch_up)) + (k - 1) * self.draft(b)
            speed = sum(expected_tokens(a, k) for a in rates) / seconds
            if speed > best:
                best_k, best = k, speed
        return best_k

    def update(self, seq: object, drafted: int, accepted: int) -> None:
        """A verification: `accepted` of `drafted` drafts; the tokens tested are those up to the first
        rejection (the ones after it say nothing of the rate)."""
        tested = min(accepted + 1, drafted)
        for acc, decay in ((self._acceptance(seq), DECAY), (self._pooled, POOLED_DECAY)):
            acc.accepted = decay * acc.accepted + accepted
            acc.tested = decay * acc.tested + tested

    def forget(self, live: AbstractSet[object]) -> None:
        for seq in [s for s in self._seqs if s not in live]:
            del self._seqs[seq]
