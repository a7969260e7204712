"""Warm prefill over a cached prefix, chunk attention as batched GEMMs (today) vs SDPA with a mask
(before), interleaved in one process: the step that decides TTFT when a prompt's prefix is cached.

    .venv/bin/python -m tinyserve_lab.ablations.chunk_attention --rounds 3
    .venv/bin/python -m tinyserve_lab.ablations.chunk_attention --layer 34 1058 --layer 512 1536   # one layer

The bundled model at its defaults (bf16 + GGUF blocks), eager; a 1,024-token shared prefix is cached
once, then each measured step prefills one new prompt's ~34 uncached tokens over it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tinyserve import LLM, SamplingParams
from tinyserve.attention import base
from tinyserve_lab.datasets import sample_shared_prefix


def sdpa_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: base.PrefillChunk,
                         scale: float) -> torch.Tensor:
    """The previous path: one SDPA call with the chunk's bias as its mask."""
    return F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=c.folded_bias(q.dtype, 1), scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[0])[0].transpose(0, 1)


def time_layer(num_queries: int, context: int, reps: int = 50) -> None:
    """One layer's chunk attention alone (the bundled model's 9 query / 3 KV heads of 64, bf16, 1 thread)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    h, h_kv, d, dt = 9, 3, 64, torch.bfloat16
    q = torch.randn(num_queries, h, d, dtype=dt)
    k, v = torch.randn(h_kv, context, d, dtype=dt), torch.randn(h_kv, context, d, dtype=dt)
    layout = base.BatchLayout([], [], torch.zeros(0, dtype=torch.long), 16, torch.device("cpu"))
    span = base.SeqSpan(0, num_queries, context - num_queries, list(range(-(-context // 16))))
    chunk = base.AttentionBackend._prefill_chunk(span, layout)
    for name, fn in (("gemm (today)", base.chunk_attention), ("sdpa (before)", sdpa_chunk_attention)):
        best = float("inf")
        for _ in range(3):
            fn(q, k, v, chunk, d**-0.5)
            t = time.perf_counter()
            for _ in range(reps):
                fn(q, k, v, chunk, d**-0.5)
            best = min(best, (time.perf_counter() - t) / reps * 1e3)
        print(f"{name:14s} one layer, {num_queries} queries x {context} keys: best of 3 x {reps}: {best:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="warm prefill steps per variant and round")
    p.add_argument("--layer", nargs=2, type=int, action="append", metavar=("QUERIES", "CONTEXT"),
                   help="time one layer's attention alone at this shape instead (repeatable)")
    args = p.parse_args()
    if args.layer:
        for num_queries, context in args.layer:
            time_layer(num_queries, context)
        return
    llm = LLM(enforce_eager=True)
    engine = llm.engine
    reqs = sample_shared_prefix(llm.tokenizer, 1 + 2 * args.rounds * args.steps, 1024, question_len=32, seed=1)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(reqs[0].prompt, params)  # caches the prefix
    variants = {"gemm (today)": base.chunk_attention, "sdpa (before)": sdpa_chunk_attention}
    times: dict[str, list[float]] = {name: [] for name in variants}
    pending = iter(reqs[1:])
    cached: set[int] = set()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            base.chunk_attention = fn  # prefill_attention looks it up at call time
            for _ in range(args.steps):
                r = next(pending)
                (seq,) = engine.add_request("probe", r.prompt, params)
                t = time.perf_counter()
                engine.step()
                times[name].append((time.perf_counter() - t) * 1e3)
                cached.add(seq.num_cached_tokens or 0)
                engine.pop_output("probe")
    base.chunk_attention = variants["gemm (today)"]
    for name, ts in times.items():
        print(f"{name:14s} warm prefill step: median {statistics.median(ts):6.1f} ms, best {min(ts):6.1f} ms "
              f"({len(ts)} steps; tokens from the cache per prompt: {sorted(cached)})")


if __name__ == "__main__":
    main()
