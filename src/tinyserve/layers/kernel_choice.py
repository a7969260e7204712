"""Which kernel a quantized linear runs, by the number of rows in the step: packed up to a crossover,
its dense copy above, the crossover measured on this machine once and cached.

The measurement times every packed linear of the model both ways at growing row counts; its answer
depends on the machine, the model and the mode, so it is cached under a key naming all of them
(worker/served_model.py builds it). An answer a busy machine could have produced is neither trusted
from the cache nor written to it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tinyserve.layers.linear import DenseWeight, Linear
from tinyserve.layers.packed import PackedWeight

log = logging.getLogger(__name__)
CANDIDATES = (1, 2, 4, 8, 16, 32, 64)  # the row counts timed, in order


def packed_weights(model: nn.Module) -> list[tuple[Linear, PackedWeight]]:
    return [(m, m.impl) for m in model.modules() if isinstance(m, Linear) and isinstance(m.impl, PackedWeight)]


def configure_packed_kernels(model: nn.Module, packed_max_rows: int | None, max_step_rows: int, dtype: torch.dtype,
                             cache: tuple[Path, str] | None = None) -> int:
    """Packed kernels for steps of up to `packed_max_rows` rows, the dense copies above; what no step can
    reach is freed (the dense copies, or with 0 the packed weights). None measures the
    crossover on this machine, once: with `cache` = (json file, key naming model, mode and machine)
    later starts read the answer instead. An implausible answer (`plausible_crossover`) is neither
    trusted from the cache nor written to it: it was measured on a busy machine. Returns the threshold."""
    weights = packed_weights(model)
    if not weights:
        return 0
    rows = packed_max_rows
    if rows is None:
        store = _CrossoverCache(cache[0]) if cache else None
        # the kernels in use are part of the key: a model whose layers gain a packed kernel measures afresh
        key = f"{cache[1]}|{'+'.join(sorted({str(getattr(w, 'kind', '?')) for _, w in weights}))}" if cache else ""
        rows = store.get(key) if store else None
        if rows is not None and not plausible_crossover(rows, dtype):
            log.info("cached kernel choice (%d rows) is implausible in %s: measuring again", rows, dtype)
            rows = None
        if rows is None:
            rows, timings = choose_packed_max_rows(model, dtype)
            log.info("packed kernels up to %d rows per step (ms packed/dense by rows: %s)", rows,
                     ", ".join(f"{m}: {p:.1f}/{d:.1f}" for m, (p, d) in timings.items()))
            if not plausible_crossover(rows, dtype):
                log.warning("the packed kernels lost to dense even at one row in %s (a busy machine?): "
                            "dense for this start, not cached", dtype)
            elif rows < CANDIDATES[-1] and not any(m > rows for m in timings):  # cut short by the budget
                log.info("kernel choice not cached: its time ran out before dense won")
            elif store:
                store.put(key, rows)
    for lin, w in weights:
        w.packed_max_rows = rows
        if rows >= max_step_rows:
            w.drop_copy()
        elif rows == 0 and w.dense is not None:  # never packed: keep only the dense copy
            lin.impl = DenseWeight(w.dense)
    return rows


def plausible_crossover(rows: int, dtype: torch.dtype) -> bool:
    """With 16-bit activations a packed weight streams 2-4x fewer bytes than its dense copy, so a
    one-row product (decode: bandwidth bound) must favor it; a measurement that says "dense from one
    row" (0) was disturbed. In fp32 the packed kernels also convert activations and may lose: any answer."""
    return rows > 0 or dtype == torch.float32


class _CrossoverCache:
    """Measured crossovers in a small JSON file: {key: rows}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, int]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> int | None:
        return self._read().get(key)

    def put(self, key: str, rows: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**self._read(), key: rows}, indent=1, sort_keys=True))
            tmp.replace(self.path)  # atomic: concurrent starts never read half a file
        except OSError as e:  # a read-only home is no reason not to serve
            log.warning("could not cache the kernel choice in %s: %s", self.path, e)


def _alike(with_copy: Sequence[tuple[Linear, PackedWeight]]) -> list[list[tuple[Linear, PackedWeight]]]:
    """The linears grouped by shape and kernel: the layers of a model repeat a few of them, and timing one
    of each, scaled by its count, costs a layer instead of the model (the 1.5B: cut at the 8 s budget
    before, whole in 3.8 s now; REPORT VR)."""
    groups: dict[tuple[int, int, str], list[tuple[Linear, PackedWeight]]] = {}
    for lin, w in with_copy:
        groups.setdefault((lin.in_features, lin.out_features, str(getattr(w, "kind", "?"))), []).append((lin, w))
    return list(groups.values())


def _time_kernels(groups: Sequence[Sequence[tuple[Linear, PackedWeight]]], xs: dict[int, torch.Tensor],
                  reps: int) -> tuple[float, float]:
    """Best-of-`reps` ms for every packed linear one way, then the other (one of each group, times its
    count), the two interleaved rep by rep so that a burst of load from elsewhere hits both alike rather
    than one whole side. Each rep takes another member of a group: its weights are not in the caches
    from the rep before, as in a step they would not be."""
    best = [float("inf"), float("inf")]
    for rep in range(reps):
        for side in (0, 1):
            total = 0.0
            for group in groups:
                lin, w = group[rep % len(group)]
                start = time.perf_counter()
                w.packed_mm(xs[lin.in_features]) if side == 0 else w.copy_mm(xs[lin.in_features])
                total += (time.perf_counter() - start) * len(group)
            best[side] = min(best[side], total)
    return best[0] * 1e3, best[1] * 1e3


@torch.inference_mode()
def choose_packed_max_rows(model: nn.Module, dtype: torch.dtype, candidates: Sequence[int] = CANDIDATES,
                           reps: int = 3, budget_s: float = 8.0) -> tuple[int, dict[int, tuple[float, float]]]:
    """Time every packed linear of the model both ways at growing row counts until the dense copy
    wins; the last count at which packed was faster (0 if it never is). Also returns the timings (ms).
    Stopping at the first loss bounds the start-up cost (a slow packed kernel loses at once); a loss
    is measured a second time (best of both) before it stands, so one disturbed sample cannot end it.
    Past `budget_s` (a large model, a slow machine) no larger count is tried: the answer is then a
    lower bound, which costs some speed at large batches but never a wrong result."""
    weights = packed_weights(model)
    with_copy = [(lin, w) for lin, w in weights if w.has_copy]
    if not weights or len(with_copy) < len(weights):
        return (1 << 30 if weights else 0), {}
    # With int8 copies the compiled decode step multiplies on them above the crossover: time those.
    int8 = {w: w.int8_active for _, w in with_copy if w.dense_q is not None}
    for w in int8:
        w.int8_active = True
    try:
        return _crossover(with_copy, dtype, candidates, reps, budget_s)
    finally:
        for w, active in int8.items():  # as they were: eager steps too, where the CPU has no AMX
            w.int8_active = active


def _crossover(with_copy: Sequence[tuple[Linear, PackedWeight]], dtype: torch.dtype, candidates: Sequence[int],
               reps: int, budget_s: float) -> tuple[int, dict[int, tuple[float, float]]]:
    timings: dict[int, tuple[float, float]] = {}
    best = 0
    groups = _alike(with_copy)
    deadline = time.perf_counter() + budget_s
    for m in candidates:
        if time.perf_counter() > deadline:
            log.info("kernel choice: out of time after %d rows; packed up to there", best)
            break
        xs = {lin.in_features: torch.randn(m, lin.in_features, dtype=dtype, device=next(w.buffers()).device)
              for lin, w in with_copy}
        _time_kernels(groups, xs, 1)  # warm-up
        packed, dense = _time_kernels(groups, xs, reps)
        if packed > dense:  # confirm: the best of twice the samples
            again = _time_kernels(groups, xs, reps)
            packed, dense = min(packed, again[0]), min(dense, again[1])
        timings[m] = (packed, dense)
        if packed > dense:
            break
        best = m
    return best, timings
