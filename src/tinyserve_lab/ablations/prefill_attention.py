"""Prompt attention on our AVX512-BF16 kernel (attention/prefill.py) vs what ran before, side by side:

- the kernel alone (`--kernel`): one layer's causal attention over a fresh prompt against PyTorch's SDPA
  (its CPU flash attention), and a chunk over a cached prefix against `chunk_attention` (two batched GEMMs),
  at the bundled model's heads (9 query / 3 KV heads of 64) and the 1.5B's (12 / 2 of 128), the engine's
  threads;
- in the engine (default): one eager engine, the kernel switched on and off between interleaved rounds
  (forced on where the engine would keep PyTorch's attention, a CPU with AMX):
  a prompt's prefill at each `--lengths`, and held-out perplexity (the quality tool's windows) both ways.

    .venv/bin/python -m tinyserve_lab.ablations.prefill_attention --kernel
    .venv/bin/python -m tinyserve_lab.ablations.prefill_attention [--model qwen2.5-coder-1.5b] --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tinyserve import LLM
from tinyserve.attention import base
from tinyserve.attention import prefill as fast_prefill
from tinyserve.system import cpu_flags, physical_cores
from tinyserve_lab.ablations import report, rotated
from tinyserve_lab.ablations.int8_compute import prefill_ms
from tinyserve_lab.ablations.kv_cache_dtype import perplexity
from tinyserve_lab.env_info import machine_info
from tinyserve_lab.offline_models import OFFLINE_GGUFS, offline_gguf
from tinyserve_lab.quality import shakespeare_windows

SHAPES = {"bundled": (9, 3, 64), "1.5B": (12, 2, 128)}
VARIANTS = ("kernel", "before")
engine_wanted = fast_prefill.wanted


def wanted_as(on: bool, device: str | torch.device, dtype: torch.dtype) -> bool:
    """`prefill.wanted` forced: the kernel for every bf16 prefill, or for none."""
    return on and dtype == torch.bfloat16


def best_ms(reps: int, fn: Callable[..., Any], *args: Any) -> float:
    fn(*args)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        times.append((time.perf_counter() - t) / reps * 1e3)
    return min(times)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """What a fresh prompt ran before: SDPA (PyTorch's CPU flash attention) over [L, H, D] views."""
    return F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                          v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale, enable_gqa=True)


def kernel_table(lengths: list[int], chunks: list[tuple[int, int]], reps: int) -> list[dict[str, Any]]:
    rows = []
    torch.manual_seed(0)
    layout = base.BatchLayout([], [], torch.zeros(0, dtype=torch.long), 16, torch.device("cpu"))
    for shape, (h, h_kv, d) in SHAPES.items():
        scale = d**-0.5
        for n in lengths:
            q = torch.randn(n, h, d, dtype=torch.bfloat16)
            k, v = torch.randn(n, h_kv, d, dtype=torch.bfloat16), torch.randn(n, h_kv, d, dtype=torch.bfloat16)
            ours = best_ms(reps, fast_prefill.attend, q, k, v, scale)
            before = best_ms(reps, sdpa_causal, q, k, v, scale)
            flops = 4 * n * (n + 1) / 2 * d * h
            rows.append({"shape": shape, "case": "fresh", "queries": n, "keys": n, "kernel_ms": ours,
                         "before": "sdpa", "before_ms": before, "kernel_gflops": flops / ours / 1e6,
                         "before_gflops": flops / before / 1e6, "speedup": before / ours})
        for n, ctx in chunks:
            q = torch.randn(n, h, d, dtype=torch.bfloat16)
            k, v = torch.randn(h_kv, ctx, d, dtype=torch.bfloat16), torch.randn(h_kv, ctx, d, dtype=torch.bfloat16)
            chunk = base.AttentionBackend._prefill_chunk(base.SeqSpan(0, n, ctx - n, list(range(-(-ctx // 16)))),
                                                         layout)
            ours = best_ms(reps, fast_prefill.attend, q, k.transpose(0, 1), v.transpose(0, 1), scale)
            before = best_ms(reps, base.chunk_attention, q, k, v, chunk, scale)
            rows.append({"shape": shape, "case": "chunk", "queries": n, "keys": ctx, "kernel_ms": ours,
                         "before": "chunk_attention", "before_ms": before, "speedup": before / ours})
        for r in rows[-len(lengths) - len(chunks):]:
            print(f"{r['shape']:8s} {r['case']:6s} {r['queries']:5d} x {r['keys']:5d}: kernel {r['kernel_ms']:.3f} ms, "
                  f"{r['before']} {r['before_ms']:.3f} ms ({r['speedup']:.2f}x)", flush=True)
    return rows


def in_engine(model: str | None, lengths: list[int], rounds: int, windows: int, window_tokens: int) -> dict[str, Any]:
    llm = LLM(model, dtype="bfloat16", enforce_eager=True, enable_prefix_caching=False)
    texts, source = shakespeare_windows(llm.tokenizer, windows, window_tokens)
    times: dict[str, dict[int, list[float]]] = {v: {n: [] for n in lengths} for v in VARIANTS}
    ppl: dict[str, float] = {}
    for i in range(rounds):
        for variant in rotated(VARIANTS, i):
            # what usable() asks, per call: forced either way, so an AMX machine (where the engine keeps
            # PyTorch's attention) can time the kernel too
            fast_prefill.wanted = functools.partial(wanted_as, variant == "kernel")
            for n in lengths:
                times[variant][n].append(prefill_ms(llm, n, seed=100 * i + n))
            if i == 0:
                ppl[variant] = perplexity(llm, texts)
            print(variant, {n: round(t[-1], 1) for n, t in times[variant].items()}, flush=True)
    fast_prefill.wanted = engine_wanted
    return {"prefill_ms": {v: {str(n): statistics.median(t) for n, t in d.items()} for v, d in times.items()},
            "prefill_ms_all": {v: {str(n): t for n, t in d.items()} for v, d in times.items()},
            "perplexity": ppl, "text": source}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", action="store_true", help="the kernel alone against what it replaced")
    p.add_argument("--model", choices=sorted(OFFLINE_GGUFS), help="an offline GGUF (default: the bundled model)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--chunk", type=int, nargs=2, action="append", metavar=("QUERIES", "CONTEXT"),
                   help="--kernel's chunks over a cached prefix (default: 34 x 1058 and 256 x 1280)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=10, help="--kernel's calls per timing")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-tokens", type=int, default=256)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if "avx512_bf16" not in cpu_flags():
        raise SystemExit("this CPU has no AVX512-BF16: the kernel does not run here")
    torch.set_num_threads(physical_cores())
    fast_prefill.OPS.load()
    result: dict[str, Any] = {"machine": machine_info(), "threads": torch.get_num_threads()}
    if args.kernel:
        result["kernel"] = kernel_table(args.lengths, args.chunk or [(34, 1058), (256, 1280)], args.reps)
    else:
        model = str(offline_gguf(args.model)) if args.model else None
        result.update(model=args.model or "bundled", **in_engine(model, args.lengths, args.rounds, args.windows,
                                                                  args.window_tokens))
    report(result, args.json)


if __name__ == "__main__":
    main()
