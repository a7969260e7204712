"""What a decode step costs by its number of rows, measured on this machine at start-up
(`ModelRunner.decode_step_seconds`): the price of verifying k + 1 rows per sequence instead of one,
and of a draft model's steps.

On a CPU that price depends on the weight mode more than on anything else: dense bf16 linears read
the same bytes for 1 row or 5 (memory-bound), while the packed int4 kernel's work grows with the
rows, and above the packed/dense crossover the step switches to the dense copies. A table measured
here, interpolated between the sizes it has, is what the draft-length controller weighs
acceptance against (controller.py).
"""

from __future__ import annotations

import bisect


def row_counts(top: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... up to `top`: dense where k + 1 rows of a small batch fall."""
    sizes = {1, 2, 3, 4}
    n = 4
    while n < top:
        sizes |= {n + n // 2, 2 * n}
        n *= 2
    return sorted(s for s in sizes if s <= top) or [1]


class StepCost:
    """Seconds of a decode step by rows, linear between measured sizes (flat beyond the largest's rate)."""

    def __init__(self, seconds: dict[int, float]) -> None:
        self.rows = sorted(seconds)
        self.seconds = [seconds[r] for r in self.rows]

    def __call__(self, rows: int) -> float:
        i = bisect.bisect_left(self.rows, rows)
        if i < len(self.rows) and self.rows[i] == rows:
            return self.seconds[i]
        if i == 0:
            return self.seconds[0]
        if i == len(self.rows):  # beyond the table: the last rate per row
            return self.seconds[-1] * rows / self.rows[-1]
        r0, r1, s0, s1 = self.rows[i - 1], self.rows[i], self.seconds[i - 1], self.seconds[i]
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
