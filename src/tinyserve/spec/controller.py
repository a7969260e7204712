"""How many tokens to draft this step: the k that maximizes expected tokens per second, from each
sequence's measured acceptance and the measured price of the step (spec/cost.py).

With per-token acceptance rate a, k drafts emit (1 - a^(k+1)) / (1 - a) tokens on average (the
accepted run plus the target's own token; Leviathan et al. 2023). A step of B decodes drafting k
each costs one target forward over B (k + 1) rows plus k draft-model steps over B rows. The
controller picks the k in 0..K with the most tokens per second, so it stops drafting by itself
when acceptance is low, when the draft is slow, or when the batch is large enough that k more rows
per sequence cost more than they return. Switched off, it drafts one token every PROBE_EVERY steps
to see whether the text has turned predictable. A sequence's rate is estimated from its own
verifications, decayed so that it follows the text, starting from a prior.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from tinyserve.spec.cost import StepCost

PRIOR_RATE, PRIOR_WEIGHT = 0.5, 2.0  # what a new sequence is assumed to accept, worth two tested drafts
DECAY = 0.8  # per verification
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
        self._off_steps = 0

    def rate(self, seq: object) -> float:
        return self._seqs.setdefault(seq, _Acceptance()).rate

    def choose(self, seqs: list[object]) -> int:
        """k for a step in which `seqs` decode."""
        if not self.adaptive or self.target is None:
            return self.k_max
        k = self.best_k([self.rate(s) for s in seqs])
        if k == 0:
            self._off_steps += 1
            if self._off_steps >= PROBE_EVERY:
                self._off_steps = 0
                return 1
        return k

    def best_k(self, rates: list[float]) -> int:
        assert self.target is not None
        b = len(rates)
        plain = b / self.target(b)
        best_k, best = 0, plain * MIN_GAIN
        for k in range(1, self.k_max + 1):
            seconds = self.target(b * (k + 1)) + (k * self.draft(b) if self.draft is not None else 0.0)
            speed = sum(expected_tokens(a, k) for a in rates) / seconds
            if speed > best:
                best_k, best = k, speed
        return best_k

    def update(self, seq: object, drafted: int, accepted: int) -> None:
        """A verification: `accepted` of `drafted` drafts; the tokens tested are those up to the first
        rejection (the ones after it say nothing of the rate)."""
        acc = self._seqs.setdefault(seq, _Acceptance())
        acc.accepted = DECAY * acc.accepted + accepted
        acc.tested = DECAY * acc.tested + min(accepted + 1, drafted)

    def forget(self, live: AbstractSet[object]) -> None:
        for seq in [s for s in self._seqs if s not in live]:
            del self._seqs[seq]
