"""`tinyserve bench decode`: plain greedy decode speed (no speculation), one JSON line.

Two measures, both with `--batch` requests in flight (repeatable; default 1 and 16):
- generate (default): output tok/s of `LLM.generate` on chat prompts, 128 tokens each, best of 2
  passes; batch 1 runs 4 prompts one at a time, a larger batch that many prompts at once.
- `--per-step`: ms per engine decode step (and rows / ms as tok/s): the batch's sequences of 128
  prompt tokens are prefilled, decoded 3 steps to warm up, then `--steps` steps are timed.

It imports only the public API (`from tinyserve import LLM, SamplingParams`), and of the engine reads
old attributes (or newer ones with getattr), so any commit's tree can be timed side by side. A tree from before
the lab package has no tinyserve_lab, so this checkout's src/ can follow it on the path (a later
tree's own lab would win: scripts/ablate_commits.sh puts a folder holding only this lab first):

    tinyserve bench decode [--batch 1] [--quantization none]
    tinyserve bench decode --per-step --batch 32 --dtype bfloat16 --quantization gguf --packed-max-rows 16
    PYTHONPATH=/other/checkout/src:src .venv/bin/python -m tinyserve_lab.decode_speed --batch 1
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tinyserve_lab.datasets import CHAT

QUESTIONS = CHAT[:4]
MAX_TOKENS, PASSES = 128, 2  # generate
PROMPT_TOKENS, WARM_UP_STEPS = 128, 3  # --per-step


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, action="append", help="requests in flight (repeatable; default: 1 and 16)")
    p.add_argument("--per-step", action="store_true", help="ms per engine decode step instead of generate() tok/s")
    p.add_argument("--steps", type=int, default=30, help="with --per-step: timed steps")
    p.add_argument("--model", default=None, help="a GGUF file or HF directory (default: the bundled model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto", help="the weight mode (auto: the bundled GGUF's int4 blocks)")
    # Passed on only when given, so a tree older than the knob still runs.
    p.add_argument("--packed-max-rows", type=int, default=None)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--enforce-eager", action="store_true", default=None)


def run_decode(args: argparse.Namespace) -> int:
    import tinyserve
    from tinyserve import LLM

    batches = args.batch or [1, 16]
    knobs = {k: v for k in ("packed_max_rows", "attention_backend", "enforce_eager")
             if (v := getattr(args, k)) is not None}
    # The engine sizes of the two scripts merged here, so their earlier numbers stay comparable:
    # generate ran with 16 sequences and a 0.5 GB pool, the step timer with the engine's defaults.
    size: dict[str, Any] = {"max_num_seqs": max(64, *batches)} if args.per_step else \
        {"max_num_seqs": max(16, *batches), "kv_cache_memory_gb": 0.5}
    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, quantization=args.quantization, **size, **knobs)
    engine = llm.engine
    result: dict[str, Any] = {
        "tree": tinyserve.__file__, "model": engine.source.name, "dtype": args.dtype,
        "quantization": engine.quantization, "load_s": round(time.perf_counter() - start, 1),
        # getattr: trees before the attention registry and the compiled step have neither
        "attention_backend": getattr(getattr(engine, "attention", None), "name", None),
        "compiled": getattr(engine.runner, "compiled", None) is not None,
        "measure": "step" if args.per_step else "generate",
    }
    for batch in batches:
        if args.per_step:
            ms = step_ms(engine, batch, args.steps)
            result |= {f"b{batch}_ms_per_step": round(ms, 2), f"b{batch}_tok_s": round(batch / ms * 1e3, 1)}
        else:
            result[f"b{batch}_tok_s"] = round(generate_tok_s(llm, batch), 1)
    print(json.dumps(result), flush=True)
    return 0


def generate_tok_s(llm: Any, batch: int) -> float:
    """Best-of-PASSES output tok/s of greedy `generate` calls of `batch` chat prompts each (4 calls at batch 1)."""
    from tinyserve import SamplingParams

    n = max(4, batch)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"{q} ({i})"}], True)
               for i, q in enumerate((QUESTIONS * n)[:n])]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8))  # warm the paths
    best = 0.0
    for _ in range(PASSES):
        t0 = time.perf_counter()
        outs = [o for i in range(0, n, batch) for o in llm.generate(prompts[i : i + batch], params)]
        best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
    return best


def step_ms(engine: Any, batch: int, steps: int) -> float:
    """ms per engine step once `batch` sequences of PROMPT_TOKENS are prefilled and decoding; drained after."""
    from tinyserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=WARM_UP_STEPS + steps + 8, ignore_eos=True)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [100 + i + j for j in range(PROMPT_TOKENS)], params)
    while any(s.num_computed < s.num_prompt_tokens for s in [*engine.scheduler.running, *engine.scheduler.waiting]):
        engine.step()  # prefill
    for _ in range(WARM_UP_STEPS):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - start) / steps * 1e3
    while engine.has_unfinished():
        engine.step()
    for rid in ids:
        engine.pop_output(rid)
    return ms


def main(argv: list[str] | None = None) -> int:
    """`python -m tinyserve_lab.decode_speed`: the command without the CLI, for a tree whose CLI lacks it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_args(p)
    return run_decode(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
