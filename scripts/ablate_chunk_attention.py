"""Warm prefill over a cached prefix, chunk attention as batched GEMMs (today) vs SDPA with a mask
(before), interleaved in one process: the step that decides TTFT when a prompt's prefix is cached.

    .venv/bin/python scripts/ablate_chunk_attention.py --rounds 3

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
from tinyserve.bench.datasets import sample_shared_prefix


def sdpa_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: base.PrefillChunk,
                         scale: float) -> torch.Tensor:
    """The previous path: one SDPA call with the chunk's bias as its mask."""
    return F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=c.folded_bias(q.dtype, 1), scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[0])[0].transpose(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="warm prefill steps per variant and round")
    args = p.parse_args()
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
