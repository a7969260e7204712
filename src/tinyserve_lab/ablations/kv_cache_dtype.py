"""The KV pool's format, side by side (`--kv-cache-dtype auto` vs `int8`), one engine per format:

- quality: perplexity of held-out text (Hamlet, the quality tool's windows) scored through the pool:
  prompts prefilled in chunks of `--chunk` tokens, so every chunk after the first attends to K/V read
  back from the pool (a fresh one-chunk prefill never reads it), and greedy agreement of chat answers;
- capacity: blocks in the same `--kv-cache-memory-gb`, and how many `--capacity-len`-token sequences fit;
- speed: a decode step at batch 1 and 32 (`tinyserve profile`'s timing), the formats interleaved.

    .venv/bin/python -m tinyserve_lab.ablations.kv_cache_dtype                              # bundled
    .venv/bin/python -m tinyserve_lab.ablations.kv_cache_dtype --model qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from typing import Any

from tinyserve import LLM, SamplingParams
from tinyserve_lab.ablations import rotated
from tinyserve_lab.datasets import CHAT
from tinyserve_lab.offline_models import OFFLINE_GGUFS, offline_gguf
from tinyserve_lab.profile import decode_ms
from tinyserve_lab.quality import common_prefix, shakespeare_windows

FORMATS = ("auto", "int8")


def perplexity(llm: LLM, windows: list[list[int]]) -> float:
    outs = llm.generate(windows, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    nll = []
    for o, w in zip(outs, windows):
        assert o.prompt_logprobs is not None
        nll += [-lp[tok].logprob for lp, tok in zip(o.prompt_logprobs[1:], w[1:]) if lp is not None]
    return math.exp(statistics.mean(nll))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"a path or one of {', '.join(OFFLINE_GGUFS)} (default: bundled)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--chats", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.25)
    p.add_argument("--capacity-len", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = str(offline_gguf(args.model)) if args.model in OFFLINE_GGUFS else args.model
    # chunked prefill and no prefix cache: every scored position past the first chunk reads the pool
    llms = {f: LLM(model, kv_cache_dtype=f, max_num_batched_tokens=args.chunk, max_num_seqs=32,
                   enable_prefix_caching=False, kv_cache_memory_gb=args.kv_cache_memory_gb) for f in FORMATS}
    windows, _ = shakespeare_windows(llms["auto"].tokenizer, args.windows, args.window_tokens)
    chats = [[{"role": "user", "content": CHAT[i % len(CHAT)]}] for i in range(args.chats)]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    answers = {f: [o.outputs[0].token_ids for o in llm.chat(chats, greedy)] for f, llm in llms.items()}
    result: dict[str, Any] = {"model": llms["auto"].engine.model_name, "chunk": args.chunk, "formats": {}}
    for f, llm in llms.items():
        e = llm.engine
        agree = [common_prefix(a, b) / max(len(a), 1) for a, b in zip(answers["auto"], answers[f])]
        result["formats"][f] = {
            "perplexity": perplexity(llm, windows), "blocks": e.num_blocks,
            "bytes_per_token": e.model_config.kv_bytes_per_token(e.config.torch_dtype, f),
            "max_seqs_of_len": e.num_blocks * e.config.block_size // args.capacity_len,
            "greedy_identical": sum(a == b for a, b in zip(answers["auto"], answers[f])),
            "greedy_prefix_agreement": statistics.mean(agree), "decode_ms": {"1": [], "32": []}}
    for r in range(args.rounds):
        for f in rotated(FORMATS, r):
            for batch in (1, 32):
                result["formats"][f]["decode_ms"][str(batch)].append(decode_ms(llms[f].engine, batch, 256, 16))
    base = result["formats"]["auto"]
    for row in result["formats"].values():
        row["perplexity_vs_auto"] = row["perplexity"] / base["perplexity"] - 1
        row["capacity_vs_auto"] = row["max_seqs_of_len"] / max(base["max_seqs_of_len"], 1)
        for b in ("1", "32"):
            row[f"decode_ms_{b}_median"] = statistics.median(row["decode_ms"][b])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
