"""Time the engine's decode step offline: `batch` sequences of 128 prompt tokens, then 30 steps.

    .venv/bin/python scripts/time_decode_step.py --dtype bfloat16 --quantization gguf --batch 1
Prints one JSON line: ms per step and tok/s. Used by scripts/ablate_commits.sh to compare two
commits side by side (run it with PYTHONPATH pointing at another checkout's src/).
"""

from __future__ import annotations

import argparse
import json
import time

from tinyserve import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--packed-max-rows", type=int, default=None)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    kw = {} if args.packed_max_rows is None else {"packed_max_rows": args.packed_max_rows}
    kw |= {"attention_backend": args.attention_backend, "enforce_eager": args.enforce_eager}
    engine = LLM(dtype=args.dtype, quantization=args.quantization, max_num_seqs=max(64, args.batch), **kw).engine
    params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [100 + i + j for j in range(128)], params)
    while any(s.num_computed < s.num_prompt_tokens for s in [*engine.scheduler.running, *engine.scheduler.waiting]):
        engine.step()  # prefill
    for _ in range(3):
        engine.step()  # warm-up decodes
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    print(json.dumps({"dtype": args.dtype, "quantization": args.quantization, "batch": args.batch,
                      "attention_backend": engine.attention.name, "compiled": engine.runner.compiled is not None,
                      "ms_per_step": round(ms, 2), "tok_s": round(args.batch / ms * 1e3, 1)}))


if __name__ == "__main__":
    main()
