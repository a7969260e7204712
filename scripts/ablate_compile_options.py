"""Inductor options of the compiled decode step, interleaved on one engine: the default (freezing +
cpp_wrapper) against freezing alone. Prints the freezing-only compile time and 4 rounds of batch-1
ms per step for each.
    .venv/bin/python scripts/ablate_compile_options.py
"""

import json
import time

import torch

from tinyserve import LLM, SamplingParams
from tinyserve.worker.compiled import CompiledDecode

orig = torch.compile


def freezing_only(fn, **kw):
    return orig(fn, **{**kw, "options": {"freezing": True}})


def main() -> None:
    engine = LLM().engine  # default options: freezing + cpp_wrapper
    variants = {"freezing+cpp_wrapper": engine.runner.compiled}
    torch.compile = freezing_only
    c = CompiledDecode(engine.model, engine.config.block_size)
    t = time.perf_counter()
    c.warm_up(engine.runner.kv_caches, engine.attention.index_dtype, [1, 2, engine.packed_max_rows + 1])
    print("freezing-only compile", round(time.perf_counter() - t, 1), flush=True)
    variants["freezing"] = c
    params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    engine.add_request("r", [100 + j for j in range(128)], params)
    for _ in range(8):
        engine.step()
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(4):
        for name, compiled in variants.items():
            engine.runner.compiled = compiled
            for _ in range(3):
                engine.step()
            t = time.perf_counter()
            for _ in range(40):
                engine.step()
            res[name].append(round((time.perf_counter() - t) / 40 * 1e3, 2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
