"""The KV pool's format, side by side (`--kv-cache-dtype auto` vs `int8` vs `fp8_e4m3`), one engine per format:

- quality: perplexity of held-out text (Hamlet, the quality tool's windows) scored through the pool:
  prompts prefilled in chunks of `--chunk` tokens, so every chunk after the first attends to K/V read
  back from the pool (a fresh one-chunk prefill never reads it), and greedy agreement of chat answers;
- capacity: blocks in the same `--kv-cache-memory-gb`, and how many `--capacity-len`-token sequences fit;
- speed: a decode step at batch 1 and 32 over 256-token contexts (`tinyserve profile`'s timing), the
  formats interleaved, on engines of their own with the default step budget.

    .venv/bin/python -m tinyserve_lab.ablations.kv_cache_dtype                              # bundled
    .venv/bin/python -m tinyserve_lab.ablations.kv_cache_dtype --model qwen2.5-coder-0.5b
    .venv/bin/python -m tinyserve_lab.ablations.kv_cache_dtype --formats auto fp8_e4m3 --rounds 0  # quality only

`--error-study` instead measures, on one window's K/V as a bf16 pool holds them (every third layer), the
relative error of attention outputs when only K, or only V, is rounded to int8 per row: plain, smoothed
(the engine's K channel factors, kv/quant.py), in groups of 32, and asymmetric (min/max); queries are the
pool's own K rows, shuffled (a proxy: real queries are not stored).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from typing import Any

import torch

from tinyserve import LLM, SamplingParams
from tinyserve.config import KV_CACHE_DTYPES
from tinyserve_lab.ablations import rotated
from tinyserve_lab.datasets import CHAT
from tinyserve_lab.offline_models import OFFLINE_GGUFS, offline_gguf
from tinyserve_lab.profile import decode_ms
from tinyserve_lab.quality import common_prefix, shakespeare_windows


def perplexity(llm: LLM, windows: list[list[int]]) -> float:
    outs = llm.generate(windows, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    nll = []
    for o, w in zip(outs, windows):
        assert o.prompt_logprobs is not None
        nll += [-lp[tok].logprob for lp, tok in zip(o.prompt_logprobs[1:], w[1:]) if lp is not None]
    return math.exp(statistics.mean(nll))


def _sym(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(-1, keepdim=True) / 127
    return (x / s.clamp_min(1e-30)).round().clamp(-127, 127) * s


def _groups32(x: torch.Tensor) -> torch.Tensor:
    return _sym(x.unflatten(-1, (-1, 32))).flatten(-2)


def _asym(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = (hi - lo) / 255
    return ((x - lo) / s.clamp_min(1e-30)).round().clamp(0, 255) * s + lo


def error_study(model: str | None, window_tokens: int) -> dict[str, dict[str, float]]:
    llm = LLM(model, enforce_eager=True, enable_prefix_caching=False, max_num_batched_tokens=window_tokens)
    (window,), _ = shakespeare_windows(llm.tokenizer, 1, window_tokens)
    llm.generate([window], SamplingParams(max_tokens=1))  # a fresh engine: the window's K/V fill blocks 0..
    net = llm.engine.runner.model
    net.smooth_k_channels()  # the factors an int8 engine would use (after the window: its K is unsmoothed)
    layers = list(zip(llm.engine.runner.kv_caches, net.layers))[::3]
    schemes = {"per-row": lambda x, s: _sym(x), "per-row, smoothed": lambda x, s: _sym(x / s) * s,
               "groups of 32": lambda x, s: _groups32(x), "asymmetric": lambda x, s: _asym(x)}
    errors: dict[str, dict[str, list[float]]] = {n: {"K": [], "V": []} for n in schemes}
    g = torch.Generator().manual_seed(0)
    for (k_pool, v_pool), layer in layers:
        qk_scale = layer.get_submodule("self_attn").qk_scale
        assert isinstance(qk_scale, torch.Tensor)
        s_k = 1 / qk_scale[-k_pool.shape[2]:].float()  # K heads are divided by s
        k = k_pool.flatten(0, 1)[:window_tokens].float()
        v = v_pool.flatten(0, 1)[:window_tokens].float()
        q = k[torch.randperm(window_tokens, generator=g)[:64]]

        def attend(kx: torch.Tensor, vx: torch.Tensor) -> torch.Tensor:
            p = (torch.einsum("qhd,khd->hqk", q, kx) / kx.shape[-1] ** 0.5).softmax(-1)  # noqa: B023
            return torch.einsum("hqk,khd->qhd", p, vx)

        ref = attend(k, v)
        for name, f in schemes.items():
            errors[name]["K"].append(float((attend(f(k, s_k), v) - ref).norm() / ref.norm()))
            errors[name]["V"].append(float((attend(k, f(v, torch.ones_like(s_k))) - ref).norm() / ref.norm()))
    return {n: {t: statistics.mean(e) for t, e in d.items()} for n, d in errors.items()}


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
    p.add_argument("--rounds", type=int, default=3, help="decode timing rounds (0: quality and capacity only, eager)")
    p.add_argument("--formats", nargs="+", default=list(KV_CACHE_DTYPES), choices=KV_CACHE_DTYPES,
                   help="formats to compare (auto, the baseline, is always run)")
    p.add_argument("--error-study", action="store_true", help="the K/V rounding study instead (see above)")
    args = p.parse_args()
    model = str(offline_gguf(args.model)) if args.model in OFFLINE_GGUFS else args.model
    if args.error_study:
        print(json.dumps(error_study(model, args.window_tokens), indent=1))
        return
    # chunked prefill and no prefix cache: every scored position past the first chunk reads the pool
    formats = ["auto"] + [f for f in args.formats if f != "auto"]
    llms = {f: LLM(model, kv_cache_dtype=f, max_num_batched_tokens=args.chunk, max_num_seqs=32,
                   enable_prefix_caching=False, kv_cache_memory_gb=args.kv_cache_memory_gb,
                   compile="blocking" if args.rounds else "off") for f in formats}
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
    # Timing on engines with the default step budget: under the 64-token chunks above, 32 prompts of
    # 256 take hundreds of steps to prefill while the first ones decode, and the timed contexts would drift.
    del llms
    timed = {f: LLM(model, kv_cache_dtype=f, max_num_seqs=32, enable_prefix_caching=False,
                    kv_cache_memory_gb=args.kv_cache_memory_gb, compile="blocking")
             for f in (formats if args.rounds else [])}
    for r in range(args.rounds):
        for f in rotated(formats, r):
            for batch in (1, 32):
                result["formats"][f]["decode_ms"][str(batch)].append(decode_ms(timed[f].engine, batch, 256, 16))
    base = result["formats"]["auto"]
    for row in result["formats"].values():
        row["perplexity_vs_auto"] = row["perplexity"] / base["perplexity"] - 1
        row["capacity_vs_auto"] = row["max_seqs_of_len"] / max(base["max_seqs_of_len"], 1)
        for b in ("1", "32") if args.rounds else ():
            row[f"decode_ms_{b}_median"] = statistics.median(row["decode_ms"][b])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
