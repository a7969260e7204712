"""Inductor options of the compiled decode step, interleaved on one engine: the default (freezing +
cpp_wrapper) against freezing alone. Prints the freezing-only compile time and `--rounds` rounds of
batch-1 ms per step for each (a fresh 128-token request per measurement: both at the same context).

    .venv/bin/python -m tinyserve_lab.ablations.compile_options [--rounds 4] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from tinyserve import LLM
from tinyserve.worker.compiled import CompiledDecode
from tinyserve_lab.profile import decode_ms


def freezing_only(engine_step: CompiledDecode) -> CompiledDecode:
    """A CompiledDecode like the engine's but compiled with freezing alone (torch.compile is swapped while
    it is built, since CompiledDecode names its options itself); warmed up for the same regimes."""
    compile_ = torch.compile

    def compile_freezing(fn: Any, **kw: Any) -> Any:
        return compile_(fn, **{**kw, "options": {"freezing": True}})

    torch.compile = compile_freezing  # type: ignore[assignment]
    try:
        c = CompiledDecode(engine_step.model, engine_step.block_size, engine_step.packed_max_rows,
                           engine_step.two_row_minimum)
    finally:
        torch.compile = compile_
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    engine = LLM().engine  # default options: freezing + cpp_wrapper
    default = engine.runner.compiled
    if default is None:
        raise SystemExit("the engine runs eager here: nothing compiled to compare")
    variant = freezing_only(default)
    t = time.perf_counter()
    cut = default.packed_max_rows  # the engine's regimes: 1 and 2 rows, and either side of its crossover
    rows = [1, 2] if cut is None else [1, 2, cut, cut + 1]
    variant.warm_up(engine.runner.kv_caches, engine.attention.index_dtype, rows, engine.runner.scratch_block)
    print("freezing-only compile", round(time.perf_counter() - t, 1), flush=True)
    variants = {"freezing+cpp_wrapper": default, "freezing": variant}
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, compiled in variants.items():
            engine.runner.compiled = compiled
            res[name].append(round(decode_ms(engine, 1, 128, args.steps), 2))
    engine.runner.compiled = default
    print(json.dumps(res))


if __name__ == "__main__":
    main()
