"""Every weight matrix of a GGUF's decode step (all layers and the output layer), per block type, on
three kernels: ours (layers/csrc/gguf_linear.cpp, the file's blocks; where the CPU has AVX-512 VNNI also
`ours-repacked`: Q4_K and Q6_K repacked, on AMX tiles where it has them or else the vector units, at
every row count), PyTorch's int4 kernel where the type maps onto it
exactly (layers/gguf_blocks.py), and the dense bf16 copy (oneDNN; AMX where present). Rows 1 / 4 / 8
(decode batches), `--rounds` interleaved rounds, best per kernel; the machine's read bandwidth is
measured in the same run, so each kernel's GB/s (file bytes per second) reads as a share of it.

    .venv/bin/python -m tinyserve_lab.ablations.gguf_kernel [--model X.gguf] [--rows 1 4 8] [--rounds 3]
    -> a table, and docs/results/speed3/gguf-kernel-<timestamp>.json
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyserve.layers import gguf_native
from tinyserve.layers.formats import GGUFTensor
from tinyserve.layers.gguf_blocks import GGUF_INT4
from tinyserve.layers.methods import GGUFMethod
from tinyserve.models.gguf import gguf_weights
from tinyserve.models.loader import resolve_model
from tinyserve.system import physical_cores
from tinyserve_lab import roofline
from tinyserve_lab.ablations import rotated
from tinyserve_lab.env_info import run_header, save_json

KERNELS = ("ours", "ours-repacked", "int4", "dense-bf16")


def load(model: str | None) -> list[GGUFTensor]:
    """The quantized 2-D weights a decode step reads (the embedding table is looked up, not read)."""
    src = resolve_model(model)
    return [w for name, w in gguf_weights(src.path)
            if isinstance(w, GGUFTensor) and w.qtype in gguf_native.QTYPES and "embed_tokens" not in name]


def kernels(t: GGUFTensor) -> dict[str, nn.Module | torch.Tensor]:
    cpu = torch.device("cpu")
    out: dict[str, nn.Module | torch.Tensor] = {"ours": gguf_native.GGUFWeight([t], None)}
    if gguf_native.repack_available():  # at every row count; types with no repacked form as `ours` (a whole step)
        repacked = gguf_native.GGUFWeight([t], None, repack=True)
        repacked.min_rows = [1] * len(repacked.qtypes)
        out["ours-repacked"] = repacked if repacked.repacked_names else out["ours"]
    if t.qtype in GGUF_INT4:
        out["int4"] = GGUFMethod(kernel="int4", keep_dense=False).pack([t], torch.bfloat16, cpu)
    out["dense-bf16"] = gguf_native.dequantize_into([t], torch.bfloat16)
    return out


def time_pass(weights: list[tuple[GGUFTensor, dict[str, Any]]], kernel: str, xs: dict[int, torch.Tensor]) -> dict:
    """One pass over every weight with `kernel`: seconds per block type."""
    per_type: dict[str, float] = defaultdict(float)
    for t, ks in weights:
        k = ks.get(kernel)
        if k is None:
            continue
        x = xs[t.shape[1]]
        start = time.perf_counter()
        k(x) if isinstance(k, nn.Module) else F.linear(x, k)
        per_type[t.qtype] += time.perf_counter() - start
    return per_type


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a .gguf (default: the bundled model)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--result-dir", default="docs/results/speed3")
    args = p.parse_args()
    torch.set_num_threads(physical_cores())
    if not gguf_native.kernel_available():
        raise SystemExit("our GGUF kernel cannot be built here (no C++ compiler?)")
    tensors = load(args.model)
    weights = [(t, kernels(t)) for t in tensors]
    file_bytes: dict[str, int] = defaultdict(int)
    for t in tensors:
        file_bytes[t.qtype] += t.data.numel()
    ceilings = roofline.measure()
    best: dict[tuple[int, str], dict[str, float]] = {}
    with torch.inference_mode():
        for m in args.rows:
            xs = {k: torch.randn(m, k).bfloat16() for k in {t.shape[1] for t in tensors}}
            for name in KERNELS:  # warm-up (page faults, first calls)
                time_pass(weights, name, xs)
            for r in range(args.rounds):
                for name in rotated(KERNELS, r):
                    got = time_pass(weights, name, xs)
                    if not got:  # a kernel this machine has not
                        continue
                    cur = best.setdefault((m, name), {})
                    for q, s in got.items():
                        cur[q] = min(cur.get(q, float("inf")), s)
    rows = []
    for (m, name), per_type in best.items():
        for q, s in per_type.items():
            rows.append({"rows": m, "kernel": name, "type": q, "ms": round(s * 1e3, 2),
                         "file_gbs": round(file_bytes[q] / s / 1e9, 1)})
        total = sum(per_type.values())
        covered = sum(file_bytes[q] for q in per_type)
        rows.append({"rows": m, "kernel": name, "type": "all" if covered == sum(file_bytes.values()) else "mapped",
                     "ms": round(total * 1e3, 2), "file_gbs": round(covered / total / 1e9, 1)})
    print(f"machine read bandwidth (this run): {ceilings}")
    print(f"{'rows':>4} {'kernel':>11} {'type':>7} {'ms':>8} {'GB/s (file bytes)':>18}")
    for row in rows:
        print(f"{row['rows']:>4} {row['kernel']:>11} {row['type']:>7} {row['ms']:>8} {row['file_gbs']:>18}")
    doc = {**run_header("tinyserve.gguf-kernel/1", model=args.model or "bundled", threads=torch.get_num_threads()),
           "ceilings": ceilings, "file_bytes": dict(file_bytes), "rows": rows}
    print("wrote", save_json(doc, Path(args.result_dir), "gguf-kernel"))


if __name__ == "__main__":
    main()
