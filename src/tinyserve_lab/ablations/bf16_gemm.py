"""A model's dense bf16 products, ATen's `F.linear` (oneDNN) against ours on weights packed once
(layers/bf16_gemm.py), at the row counts of batched decode steps and prefill chunks. With `--int8`, also
`--int8-compute`'s products on the same shapes: the reference `int8_linear` (oneDNN's `torch._int_mm`
between separate quantize and rescale passes, one scale per token, in pieces of 128 rows as eager steps
run it) and our VNNI kernel (layers/int8_gemm.py: a scale per 64 columns of a token, the weight's columns
evened out), each from bf16 activations to bf16 outputs.

Random weights of the model's shapes (a product's time does not depend on the values): q/k/v, o, gate/up
and down once each, scaled by the layer count, plus the LM head: one step's products. `--rounds`
interleaved rounds, best per kernel and shape; the machine's bf16 GEMM ceiling (2048^3, ATen) measured in
the same run.

    .venv/bin/python -m tinyserve_lab.ablations.bf16_gemm [--model X] [--rows 8 16 32 64 256] [--rounds 5] [--int8]
    -> a table, and docs/results/bf16-gemm/bf16-gemm-<timestamp>.json
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tinyserve.layers import bf16_gemm, int8_gemm
from tinyserve.layers.packed import INT8_CHUNK_ROWS, int8_linear, quantize_int8
from tinyserve.models.loader import model_config, resolve_model
from tinyserve.system import cpu_flags, physical_cores
from tinyserve_lab import roofline
from tinyserve_lab.ablations import rotated
from tinyserve_lab.env_info import run_header, save_json

BF16_KERNELS = ("aten", "ours")
INT8_KERNELS = ("int8 ref", "int8 ours")


def shapes(model: str | None) -> tuple[dict[str, tuple[int, int, int]], str]:
    """name: (in, out, times per step) of the model's products, and its name."""
    src = resolve_model(model)
    c = model_config(src)
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    layer = {"qkv_proj": (c.hidden_size, qkv), "o_proj": (c.num_heads * c.head_dim, c.hidden_size),
             "gate_up_proj": (c.hidden_size, 2 * c.intermediate_size),
             "down_proj": (c.intermediate_size, c.hidden_size)}
    out = {name: (k, n, c.num_layers) for name, (k, n) in layer.items()}
    out["lm_head"] = (c.hidden_size, c.vocab_size, 1)
    return out, src.name


def product(kernel: str, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One product on `kernel`'s form of the weight (`w`: "dense", "packed", "q", "scales", and for our int8
    kernel "q packed", "packed scales", "cols")."""
    if kernel == "aten":
        return F.linear(x, w["dense"])
    if kernel == "ours":
        return bf16_gemm.linear(x, w["packed"])
    if kernel == "int8 ref":
        return torch.cat([int8_linear(part, w["q"], w["scales"]) for part in x.split(INT8_CHUNK_ROWS)])
    return int8_gemm.linear(x, w["q packed"], w["packed scales"], w["cols"])


def forms(w: torch.Tensor, int8: bool) -> dict[str, torch.Tensor]:
    out = {"dense": w, "packed": bf16_gemm.pack(w)}
    if int8:
        out["q"], out["scales"] = quantize_int8(w, torch.float32)
        out["cols"] = int8_gemm.column_factors(w)
        q, out["packed scales"] = quantize_int8(w, torch.float32, out["cols"])
        out["q packed"] = int8_gemm.pack(q)
    return out


def best_of(fn: Callable[[], object], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an HF directory or .gguf (default: the bundled model)")
    p.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64, 256])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5, help="calls per kernel and shape in a round (best kept)")
    p.add_argument("--int8", action="store_true", help="also time --int8-compute's products (reference and ours)")
    p.add_argument("--result-dir", default="docs/results/bf16-gemm")
    args = p.parse_args()
    torch.set_num_threads(physical_cores())
    if "avx512_bf16" not in cpu_flags():
        raise SystemExit("this CPU has no AVX512-BF16: the kernel does not run here")
    bf16_gemm.OPS.load()
    kernels: tuple[str, ...] = BF16_KERNELS
    if args.int8:
        if "avx512_vnni" not in cpu_flags():
            raise SystemExit("this CPU has no AVX512-VNNI: the int8 kernel does not run here")
        int8_gemm.OPS.load()
        kernels += INT8_KERNELS
    products, name = shapes(args.model)
    weights = {s: forms(torch.randn(n, k).bfloat16(), args.int8) for s, (k, n, _) in products.items()}
    ceiling = round(roofline.gemm_gflops(torch.bfloat16), 1)
    rows = []
    with torch.inference_mode():
        for m in args.rows:
            xs = {s: torch.randn(m, k).bfloat16() for s, (k, _, _) in products.items()}
            best: dict[tuple[str, str], float] = {}
            for r in range(args.rounds):
                for kernel in rotated(kernels, r):
                    for s in products:
                        t = best_of(functools.partial(product, kernel, xs[s], weights[s]), args.reps)
                        best[kernel, s] = min(best.get((kernel, s), float("inf")), t)
            for kernel in kernels:
                step = 0.0
                for s, (k, n, times) in products.items():
                    t = best[kernel, s]
                    step += t * times
                    rows.append({"rows": m, "kernel": kernel, "product": s, "ms": round(t * 1e3, 3),
                                 "gflops": round(2 * m * k * n / t / 1e9, 1)})
                flops = sum(2 * m * k * n * times for k, n, times in products.values())
                rows.append({"rows": m, "kernel": kernel, "product": "step", "ms": round(step * 1e3, 2),
                             "gflops": round(flops / step / 1e9, 1)})
    print(f"{name}: bf16 GEMM ceiling (ATen, 2048^3, this run) {ceiling} GFLOP/s; {torch.get_num_threads()} threads")
    print(f"{'rows':>5} {'product':>13} " + " ".join(f"{k + ' ms (GF/s)':>22}" for k in kernels)
          + "  ATen / each")
    by = {(r["rows"], r["product"], r["kernel"]): r for r in rows}
    for m in args.rows:
        for s in [*products, "step"]:
            cells = [by[m, s, k] for k in kernels]
            print(f"{m:>5} {s:>13} " + " ".join(f"{c['ms']:>12} ({c['gflops']:>6})  " for c in cells)
                  + " ".join(f"{cells[0]['ms'] / c['ms']:.2f}" for c in cells[1:]))
    doc = {**run_header("tinyserve.bf16-gemm/1", model=name, threads=torch.get_num_threads()),
           "gemm_bf16_gflops": ceiling, "kernels": list(kernels), "rows": rows}
    print("wrote", save_json(doc, Path(args.result_dir), "bf16-gemm"))


if __name__ == "__main__":
    main()
