"""What a decode step costs by its number of rows, measured on this machine at start-up: the price of
verifying k + 1 rows per sequence instead of one, and of a draft model's steps.

On a CPU that price depends on the weight mode more than on anything else: dense bf16 linears read
the same bytes for 1 row or 5 (memory-bound), while the packed int4 kernel's work grows with the
rows, and above the packed/dense crossover the step switches to the dense copies. A table measured
here, interpolated between the sizes it has, is what the draft-length controller weighs
acceptance against (spec/controller.py).
"""

from __future__ import annotations

import bisect
import statistics
import time

import torch

from tinyserve.engine.compiled import decode_forward
from tinyserve.engine.runner import ModelRunner

REPEATS = 5


@torch.inference_mode()
def measure_step_seconds(runner: ModelRunner, index_dtype: torch.dtype, rows: list[int]) -> dict[int, float]:
    """Median seconds of a decode step of each row count (compiled when the runner is). Dummy rows
    write K/V into slot 0 of block 0, which holds no sequence's data before serving starts."""
    dev = runner.device
    out = {}
    for b in rows:
        ids, positions, slots = (torch.zeros(b, dtype=torch.long, device=dev) for _ in range(3))
        tables = torch.zeros(b, 2, dtype=index_dtype, device=dev)
        lens = torch.ones(b, dtype=index_dtype, device=dev)
        samples = []
        for i in range(REPEATS + 1):  # the first run warms caches
            start = time.perf_counter()
            if runner.compiled is not None:
                runner.compiled(ids, positions, runner.kv_caches, slots, tables, lens)
            else:
                decode_forward(runner.model, ids, positions, runner.kv_caches, slots, tables, lens, runner.block_size)
            if i:
                samples.append(time.perf_counter() - start)
        out[b] = statistics.median(samples)
    return out


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
