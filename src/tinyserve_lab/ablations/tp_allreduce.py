"""One all-reduce between CPU tensor-parallel ranks: gloo over the loopback vs shared memory (parallel/shm.py).

Two (`--world`) processes, one torch thread each, joined as the engine joins them (a gloo group through
a file store, the shared file mapped after it); for each shape, interleaved rounds alternate the two
paths (`rotated`), each timing `--calls` back-to-back all-reduces one by one after a warm-up; rank 0
reports the median and the mean µs per call over every round's calls. On a loaded machine the two differ
by a lot: a call whose peer is off its core waits for the scheduler, whatever the path. A decode step
of SmolLM2-135M at TP=2 makes 61 all-reduces of [batch, 576] plus the logits' gather.

    .venv/bin/python -m tinyserve_lab.ablations.tp_allreduce --json docs/results/tp/allreduce.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tinyserve.parallel import shm
from tinyserve_lab.ablations import report, rotated
from tinyserve_lab.env_info import machine_info

PATHS = ("gloo", "shm")


def _rank(rank: int, args: argparse.Namespace, tmp: str, path: str, shapes: list[tuple[int, int]],
          result: Any) -> None:
    torch.set_num_threads(1)
    world = args.world
    dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", world), rank=rank, world_size=world)
    comm = shm.ShmComm(path, rank, world, args.slot_bytes, 60.0, lambda: True)
    dist.barrier()
    dtype = getattr(torch, args.dtype)
    us: dict[str, dict[str, list[float]]] = {f"{r}x{c}": {p: [] for p in PATHS} for r, c in shapes}
    for rnd in range(args.rounds):
        for rows, cols in shapes:
            x = torch.randn(rows, cols).to(dtype)
            for name in rotated(PATHS, rnd):
                reduce = comm.all_reduce if name == "shm" else dist.all_reduce
                for _ in range(args.calls // 10):
                    reduce(x)
                dist.barrier()  # every rank starts timing together
                times = us[f"{rows}x{cols}"][name]
                for _ in range(args.calls):
                    start = time.perf_counter()
                    reduce(x)
                    times.append((time.perf_counter() - start) * 1e6)
    if rank == 0:
        result.update({shape: {p: {"median": statistics.median(v), "mean": statistics.fmean(v)}
                               for p, v in per.items()} for shape, per in us.items()})
    comm.close()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--shapes", default="1x576,32x576", help="rows x columns, comma-separated")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slot-bytes", type=int, default=1024 * 576 * 2, help="default: the engine's for SmolLM2 in bf16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shapes = [(int(r), int(c)) for r, c in (s.split("x") for s in args.shapes.split(","))]
    with tempfile.TemporaryDirectory(prefix="tinyserve-allreduce-") as tmp:
        path = shm.create(args.world, args.slot_bytes, tmp)
        if path is None:
            raise SystemExit("no room for the shared file")
        with mp.Manager() as manager:
            result = manager.dict()
            try:
                mp.spawn(_rank, args=(args, tmp, path, shapes, result), nprocs=args.world, join=True)
            finally:
                os.unlink(path)
            us = dict(result)
    report({"machine": machine_info(), "world": args.world, "dtype": args.dtype, "calls": args.calls,
            "rounds": args.rounds, "us_per_all_reduce": us,
            "speedup_of_medians": {s: v["gloo"]["median"] / v["shm"]["median"] for s, v in us.items()}}, args.json)


if __name__ == "__main__":
    main()
