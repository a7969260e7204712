"""A wave of prefills with the eager steps' native RMSNorm and SiLU * up on and off, in one process.

    .venv/bin/python -m tinyserve_lab.ablations.eager_ops [--prompts 32] [--prompt-len 256] [--rounds 3]
The bundled model (or --model) in bf16, eager steps of the default token budget: the prompts are
prefilled together (one output token each) and timed, the kernels switched on and off in
interleaved rounds (models/eager_ops.py decides per process; this flips its switch between rounds).
"""

from __future__ import annotations

import argparse
import random
import time

from tinyserve import LLM, SamplingParams
from tinyserve.models import eager_ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    llm = LLM(model=args.model, dtype="bfloat16", enforce_eager=True, enable_prefix_caching=False)
    if not eager_ops._enabled:
        raise SystemExit("the eager kernels did not load here (no compiler or no bf16 CPU path)")
    rng = random.Random(0)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    once = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(prompts[:4], once)  # warm up both paths
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for native in (True, False):
            eager_ops._enabled = native
            t = time.perf_counter()
            llm.generate(prompts, once)
            times[native].append(time.perf_counter() - t)
    eager_ops._enabled = True
    tokens = args.prompts * args.prompt_len
    for native in (True, False):
        rates = ", ".join(f"{tokens / t:.0f}" for t in times[native])
        print(f"{'native kernels' if native else 'ATen ops':>15}: {args.prompts} x {args.prompt_len} prefilled in "
              f"{min(times[native]):.2f}-{max(times[native]):.2f} s ({rates} tok/s)")


if __name__ == "__main__":
    main()
