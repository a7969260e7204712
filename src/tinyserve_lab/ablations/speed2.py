"""Speed II ablation, side by side in one process on the bundled model (defaults: bf16 + GGUF blocks):
eager + sdpa (before), eager + paged (in-place attention), compiled + paged (the default now).

Offline decode steps at batch 1 and 32 (128-token prompts), interleaved round by round so machine
drift hits every variant alike; the best round of each is reported, with every round in the JSON.
Usage: .venv/bin/python -m tinyserve_lab.ablations.speed2 [--rounds 3] [--steps 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from tinyserve.config import EngineConfig
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve_lab.ablations import rotated
from tinyserve_lab.env_info import run_header, save_json
from tinyserve_lab.profile import decode_ms

VARIANTS: dict[str, dict[str, Any]] = {  # name -> EngineConfig knobs
    "eager_sdpa": dict(enforce_eager=True, attention_backend="sdpa"),
    "eager_paged": dict(enforce_eager=True, attention_backend="paged"),
    "compiled_paged": dict(enforce_eager=False, attention_backend="paged"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--result-dir", default="docs/results/speed2")
    args = p.parse_args()
    engines: dict[str, LLMEngine] = {}
    startup: dict[str, float] = {}
    for name, kw in VARIANTS.items():
        t = time.perf_counter()
        engines[name] = LLMEngine(EngineConfig(max_num_seqs=max(args.batches), **kw))
        startup[name] = round(time.perf_counter() - t, 1)
    rounds: dict[str, dict[str, list[float]]] = {n: {f"batch{b}": [] for b in args.batches} for n in VARIANTS}
    for r in range(args.rounds):
        for name in rotated(list(VARIANTS), r):
            for b in args.batches:
                rounds[name][f"batch{b}"].append(round(decode_ms(engines[name], b, 128, args.steps), 2))
    best = {n: {k: min(v) for k, v in row.items()} for n, row in rounds.items()}
    print(f"{'ms/step (best of rounds)':<26}" + "".join(f"{k:>12}" for k in best["eager_sdpa"]) + f"{'start-up s':>12}")
    for name, row in best.items():
        print(f"{name:<26}" + "".join(f"{v:>12.2f}" for v in row.values()) + f"{startup[name]:>12.1f}")
    result = run_header("tinyserve.ablation/1", experiment="speed2", torch_threads=torch.get_num_threads(),
                        rounds=args.rounds, steps=args.steps, ms_per_step=best, all_rounds=rounds,
                        startup_s=startup, compile_s=engines["compiled_paged"].compile_seconds)
    print("wrote", save_json(result, Path(args.result_dir), "ablation-speed2"))


if __name__ == "__main__":
    main()
