"""Greedy answers alone vs together, per engine configuration: 32 chat prompts generated at once, then
each alone, on one engine; prints how many answers differ, the first differing position of each, and
both wall times (the mode's cost). The default mode is expected to differ (the packed/dense switch
and GEMM blocking change a row's rounding); `--batch-invariant` must not, compiled or eager.

    .venv/bin/python -m tinyserve_lab.ablations.batch_invariance                    # default, then invariant
    .venv/bin/python -m tinyserve_lab.ablations.batch_invariance --config '{"enforce_eager": true}'
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tinyserve import LLM, SamplingParams
from tinyserve_lab.datasets import CHAT


def first_difference(a: list[int], b: list[int]) -> int:
    """The first position where two token lists differ (the shorter one's length if it is a prefix)."""
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def compare(config: dict[str, Any], prompts: list[str], max_tokens: int) -> dict[str, Any]:
    llm = LLM(**config)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    start = time.perf_counter()
    together = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp)]
    together_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = [list(llm.generate([p], sp)[0].outputs[0].token_ids) for p in prompts]
    alone_s = time.perf_counter() - start
    differ = [i for i in range(len(prompts)) if together[i] != alone[i]]
    first = [first_difference(together[i], alone[i]) for i in differ]
    return {"config": config, "prompts": len(prompts), "differ": len(differ), "first_difference_at": first,
            "together_s": round(together_s, 2), "alone_s": round(alone_s, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="LLM(...) keywords as JSON (repeatable; default: the "
                   "default mode, then batch_invariant)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()
    configs = [json.loads(c) for c in args.config] if args.config else [{}, {"batch_invariant": True}]
    prompts = [f"{CHAT[i % len(CHAT)]} (variant {i})" for i in range(args.prompts)]
    for config in configs:
        print(json.dumps(compare(config, prompts, args.max_tokens)), flush=True)


if __name__ == "__main__":
    main()
