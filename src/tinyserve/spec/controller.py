"""How many tokens each sequence drafts: the draft length that pays, from measured acceptance and cost.

The k-th draft token adds a token only if all k are accepted, which has probability a^k for a
per-token acceptance rate a; it costs about `tau` of a target step (the draft model's step, relative
to the target's, plus the extra verification row). So a sequence drafts the largest k <= K with
a^k >= tau; when even k = 1 does not pay (a < tau) it stops drafting, and tries one token again
every PROBE_EVERY steps, so a sequence whose text turns predictable is noticed. The speedup this
aims at is the classic (1 - a^(k+1)) / ((1 - a)(1 + c k)) (Leviathan et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

PRIOR_RATE, PRIOR_WEIGHT = 0.7, 2.0  # what a new sequence is assumed to accept, worth two drafted tokens
DECAY = 0.8  # per verification: the estimate follows the text as it changes
PROBE_EVERY = 16
# An extra verification row per sequence, relative to a decode step (batch 1, bundled model, CPU:
# REPORT section SD); the draft model's own cost is measured while serving.
VERIFY_ROW_COST = 0.05


@dataclass
class _Acceptance:
    accepted: float = PRIOR_RATE * PRIOR_WEIGHT
    tested: float = PRIOR_WEIGHT
    idle_steps: int = 0

    @property
    def rate(self) -> float:
        return self.accepted / self.tested


class DraftLength:
    """Per-sequence draft length; `adaptive=False` always drafts `k_max`."""

    def __init__(self, k_max: int, adaptive: bool) -> None:
        self.k_max = k_max
        self.adaptive = adaptive
        self.draft_cost = 0.0  # the draft's step / the target's step, measured (0 for n-gram lookup)
        self._seqs: dict[object, _Acceptance] = {}

    @property
    def tau(self) -> float:
        return self.draft_cost + VERIFY_ROW_COST

    def k_for(self, seq: object) -> int:
        if not self.adaptive:
            return self.k_max
        acc = self._seqs.setdefault(seq, _Acceptance())
        k = self.k_for_rate(acc.rate)
        if k == 0:
            acc.idle_steps += 1
            if acc.idle_steps >= PROBE_EVERY:
                acc.idle_steps = 0
                return 1
        return k

    def k_for_rate(self, a: float) -> int:
        """The largest k <= k_max with a^k >= tau (0 when a < tau)."""
        if a >= 1.0 or self.tau <= 0:
            return self.k_max
        if a <= 0 or a < self.tau:
            return 0
        return min(self.k_max, int(math.log(self.tau) / math.log(a) + 1e-9))

    def update(self, seq: object, drafted: int, accepted: int) -> None:
        """A verification: `accepted` of `drafted` drafts; the tokens tested are those up to the first
        rejection (the ones after it say nothing of the rate)."""
        acc = self._seqs.setdefault(seq, _Acceptance())
        acc.accepted = DECAY * acc.accepted + accepted
        acc.tested = DECAY * acc.tested + min(accepted + 1, drafted)

    def forget(self, live: AbstractSet[object]) -> None:
        for seq in [s for s in self._seqs if s not in live]:
            del self._seqs[seq]
