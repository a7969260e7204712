"""Time every linear of one decode step (all layers + LM head) per precision mode, kernel and row count.

This is the measurement behind the kernel choice per batch size (layers/kernel_choice.py): each quantized
mode has a packed kernel and a dense copy; at each row count M both are timed on the model's own
weights, in one process, best of `--reps`. Dense-only modes (fp32, bf16) are timed once.

    .venv/bin/python -m tinyserve_lab.ablations.linear_kernels            # ~3 min on 2 cores
    -> prints a table, writes docs/results/linear-kernels-<timestamp>.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tinyserve.config import EngineConfig
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve.layers.linear import Linear
from tinyserve.layers.packed import PackedWeight
from tinyserve.system import physical_cores
from tinyserve_lab.env_info import run_header, save_json

MODES = {  # name: (dtype, quantization, group)
    "fp32": ("float32", "none", 32), "bf16": ("bfloat16", "none", 32), "int8": ("bfloat16", "int8", 32),
    "int4-g32": ("bfloat16", "int4", 32), "int4-g64": ("bfloat16", "int4", 64), "gguf": ("bfloat16", "gguf", 32),
}


def kernel(lin: Linear, packed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The product `lin` runs: a packed weight's packed kernel or its dense copy; a dense weight itself."""
    impl = lin.impl
    assert impl is not None, "loaded"
    if not isinstance(impl, PackedWeight):
        return impl
    if packed:
        return impl.packed_mm
    dense = impl.dense
    assert dense is not None, "kept: the engine is built with packed_max_rows=1"
    return lambda x: F.linear(x, dense)


@torch.inference_mode()
def time_linears(linears: list[Linear], rows: int, dtype: torch.dtype, packed: bool, reps: int) -> float:
    """Best-of-`reps` ms for one pass over every linear with `rows` input rows."""
    calls = [(kernel(lin, packed), torch.randn(rows, lin.in_features, dtype=dtype)) for lin in linears]

    def one_pass() -> None:
        for fn, x in calls:
            fn(x)

    one_pass()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--result-dir", default="docs/results")
    args = p.parse_args()
    results: dict[str, dict[str, dict[int, float]]] = {}
    for name in args.modes:
        dtype_name, quant, group = MODES[name]
        # packed_max_rows below the step size: the dense copies are kept, so both kernels can be timed
        engine = LLMEngine(EngineConfig(dtype=dtype_name, quantization=quant, quant_group_size=group,
                                        num_kv_blocks=8, packed_max_rows=1))
        linears = [m for m in engine.model.modules() if isinstance(m, Linear)]
        dtype = engine.config.torch_dtype
        has_packed = any(isinstance(m.impl, PackedWeight) for m in linears)
        results[name] = {"dense": {}, **({"packed": {}} if has_packed else {})}
        for rows in args.rows:
            reps = max(2, args.reps if rows <= 64 else args.reps // 2)
            results[name]["dense"][rows] = round(time_linears(linears, rows, dtype, False, reps), 2)
            if has_packed:
                results[name]["packed"][rows] = round(time_linears(linears, rows, dtype, True, reps), 2)
            print(name, rows, {k: v[rows] for k, v in results[name].items()}, flush=True)
        del engine
    header = run_header("tinyserve.linear-kernels/1", threads=torch.get_num_threads(), cores=physical_cores(),
                        unit="ms for every linear of one step (all layers + LM head), best of reps")
    print("\n| mode | kernel | " + " | ".join(f"M={r}" for r in args.rows) + " |")
    print("|---|---|" + "---|" * len(args.rows))
    for name, kernels in results.items():
        for kernel, row in kernels.items():
            print(f"| {name} | {kernel} | " + " | ".join(f"{row[r]:.1f}" for r in args.rows) + " |")
    path = save_json({**header, "results": results}, Path(args.result_dir), "linear-kernels")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
