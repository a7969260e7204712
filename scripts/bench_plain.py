"""Plain greedy decode speed (no speculation) of the default mode, compiled: batch 1 (4 chat prompts
one at a time) and batch 16 (16 at once), 128 tokens each, best of 2 passes. Only the public `LLM`
API, so any commit's tree can be timed side by side:

    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python scripts/bench_plain.py [--b1-only]
"""

from __future__ import annotations

import argparse
import json
import time

import tinyserve
from tinyserve import LLM, SamplingParams

QUESTIONS = ("What is the capital of France, and why is it famous?", "Write a short poem about the sea.",
             "Explain photosynthesis to a child.", "Give me three tips for learning to code.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b1-only", action="store_true")
    p.add_argument("--model", default=None, help="a GGUF file or HF directory (default: the bundled model)")
    p.add_argument("--quantization", default="auto", help="the weight mode (auto: the bundled GGUF's int4 blocks)")
    args = p.parse_args()
    start = time.perf_counter()
    llm = LLM(model=args.model, max_num_seqs=16, kv_cache_memory_gb=0.5, quantization=args.quantization)
    load_s = round(time.perf_counter() - start, 1)
    result = {"tree": tinyserve.__file__, "model": llm.engine.source.name, "quantization": llm.engine.quantization,
              "load_s": load_s}
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"{q} ({i})"}], True)
               for i, q in enumerate(QUESTIONS * 4)]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8))  # warm the paths
    for batch, n in ((1, 4),) if args.b1_only else ((1, 4), (16, 16)):
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            outs = [o for i in range(0, n, batch) for o in llm.generate(prompts[i : i + batch], params)]
            best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
        result[f"b{batch}_tok_s"] = round(best, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
