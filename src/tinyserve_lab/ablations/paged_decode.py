"""Time the paged decode kernel against the sdpa back end's gather + SDPA, per call (one layer).

    .venv/bin/python -m tinyserve_lab.ablations.paged_decode [--threads 1] [--batch 32] [--context 300]
    .venv/bin/python -m tinyserve_lab.ablations.paged_decode --layers 30 --shape 12 2 128 [--source OLD.cpp]

With `--layers 1` (the default) one layer's pool is read call after call, hot in the caches, and both
back ends are timed in fp32 and bf16. With `--layers N` each call reads the next of N layers' pools,
blocks shuffled through each pool as a served engine leaves them: what a decode step sees, its K/V
coming from memory (N x the context's bytes must exceed the last-level cache). `--source` times
another version of the kernel's C++ (e.g. `git show REV:src/tinyserve/attention/csrc/paged_decode.cpp`)
in this process instead of the tree's: run it and the tree's one after the other for an A/B.
`--shape` is query heads, KV heads, head_dim (default: the bundled model's 9 3 64). `--layout` places
each sequence's blocks: `shuffled` (the default: a long-running server's free list), `sequential` (a
sequence's blocks in one run, as a fresh prompt takes them) or `interleaved` (block j of sequence i at
j x batch + i, as sequences decoding in step cross their block boundaries together).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tinyserve.attention import paged, select_backend
from tinyserve.attention.base import AttentionBackend, BatchLayout, DecodeMeta, SeqSpan

BLOCK = 16  # the engine's default block size


def per_call_ms_of(fn: Callable[[torch.Tensor, torch.Tensor], object],
                   pools: list[tuple[torch.Tensor, torch.Tensor]], reps: int) -> float:
    """ms per call of `fn` on one layer's (K, V), each call on the next layer's; median over `reps`
    passes over all of them, after two to warm up."""
    times = []
    for rep in range(reps + 2):
        t = time.perf_counter()
        for k, v in pools:
            fn(k, v)
        if rep >= 2:
            times.append((time.perf_counter() - t) / len(pools))
    return sorted(times)[len(times) // 2] * 1e3


def per_call_ms(backend: AttentionBackend, q: torch.Tensor, pools: list[tuple[torch.Tensor, torch.Tensor]],
                meta: DecodeMeta, reps: int) -> float:
    scale = q.shape[-1] ** -0.5
    return per_call_ms_of(lambda k, v: backend.decode(q, k, v, meta, scale), pools, reps)


def block_tables(layout: str, batch: int, blocks_per_seq: int, num_blocks: int) -> list[list[int]]:
    """Each sequence's block ids under `layout` (see the module's doc)."""
    if layout == "sequential":
        return [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    if layout == "interleaved":
        return [[j * batch + i for j in range(blocks_per_seq)] for i in range(batch)]
    blocks = list(range(num_blocks))
    random.Random(0).shuffle(blocks)
    return [blocks[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(batch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=300)
    p.add_argument("--layers", type=int, default=1, help="pools read in turn (1: hot in cache)")
    p.add_argument("--shape", type=int, nargs=3, default=[9, 3, 64], metavar=("HEADS", "KV_HEADS", "HEAD_DIM"))
    p.add_argument("--source", type=Path, help="another version of attention/csrc/paged_decode.cpp to time")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--layout", choices=("shuffled", "sequential", "interleaved"), default="shuffled")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.source is not None:
        paged.SOURCE = args.source.resolve()  # built and cached like the tree's, keyed by its text
    b, ctx, (h, h_kv, d) = args.batch, args.context, args.shape
    nbk = -(-ctx // BLOCK)
    num_blocks = 2 * b * nbk  # half the pool in use, the rest free
    spans = [SeqSpan(i, 1, ctx - 1, table) for i, table in enumerate(block_tables(args.layout, b, nbk, num_blocks))]
    layout = BatchLayout(spans, [], torch.zeros(b, dtype=torch.long), BLOCK, torch.device("cpu"))
    names = ("sdpa", "paged") if args.layers == 1 else ("paged",)
    dtypes = (torch.float32, torch.bfloat16) if args.layers == 1 else (torch.bfloat16,)
    for dtype in dtypes:
        shape = (num_blocks, BLOCK, h_kv, d)
        pools = [(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)) for _ in range(args.layers)]
        q = torch.randn(b, h, d, dtype=dtype)
        row = {}
        for name in names:
            backend = select_backend(name, "cpu")
            meta = backend.build(layout).decode
            assert meta is not None  # every span is a decode
            row[name] = per_call_ms(backend, q, pools, meta, args.reps)
        if args.layers > 1:  # the memory floor: a sum streaming as many bytes, contiguous, from each layer
            row["stream"] = per_call_ms_of(lambda k, v: (k[:b * nbk].sum(), v[:b * nbk].sum()), pools, args.reps)
        rows = b * ctx * h_kv
        gbs = 2 * rows * d * dtype.itemsize / row["paged"] / 1e6
        times = "  ".join(f"{n} {ms:.3f} ms" for n, ms in row.items())
        print(f"{str(dtype):>15}  {times}  ({row['paged'] * 1e6 / rows:.1f} ns per K/V row, {gbs:.1f} GB/s of K/V)"
              f"  [{args.source or 'tree'}, {args.layers} layer(s), batch {b}, context {ctx}, shape {h}/{h_kv}/{d}, "
              f"{args.layout}]")


if __name__ == "__main__":
    main()
