"""`--int8-compute` on and off, side by side (two engines, interleaved rounds):

- speed: a pure decode step at each `--batches` size (`tinyserve profile`'s timing: the compiled step, as
  served), the packed/copy crossover each engine measured, and one 512-token prefill (an eager step: the
  dense copy either way);
- quality: greedy answers to `--chats` chat prompts generated together (their decode steps are the int8
  ones), compared with the default's (and, as a yardstick, the default's own answers to each chat
  alone: batch composition alone moves a 16-bit answer); and perplexity of held-out text (Hamlet, the
  quality tool's windows) with the int8 products forced into the eager prefill (`int8_in_graph` on the
  engine's own model: the same arithmetic as the compiled step, rounded in another order), so every
  scored position pays the int8 error of every layer that has an int8 copy.

`--kernels` instead times one product per shape (the bundled model's and the 1.5B's) and row count, eager:
the bf16 GEMM, `torch._int_mm` on row-major and column-major codes, and the whole `int8_linear` (with its
quantization and rescale as separate ops): why int8 runs only inside the compiled step.

`--per-linear` instead measures which linears to run in int8: the perplexity above with the int8
products forced on each kind of linear alone, on pairs, and on all (one eager engine, copies for every
kind), the study behind `INT8_COMPUTE_LINEARS` (layers/packed.py).

    .venv/bin/python -m tinyserve_lab.ablations.int8_compute                       # bundled
    .venv/bin/python -m tinyserve_lab.ablations.int8_compute --per-linear
    .venv/bin/python -m tinyserve_lab.ablations.int8_compute --model qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from tinyserve import LLM, SamplingParams
from tinyserve.layers.packed import PackedWeight, int8_in_graph, int8_linear
from tinyserve_lab.ablations import report, rotated
from tinyserve_lab.ablations.kv_cache_dtype import perplexity
from tinyserve_lab.datasets import CHAT
from tinyserve_lab.env_info import machine_info
from tinyserve_lab.offline_models import OFFLINE_GGUFS, offline_gguf
from tinyserve_lab.profile import decode_ms
from tinyserve_lab.quality import common_prefix, shakespeare_windows

MODES = ("bf16 copy", "int8 compute")


def prefill_ms(llm: LLM, tokens: int, seed: int) -> float:
    ids = torch.randint(100, llm.engine.model_config.vocab_size - 100, (tokens,),
                        generator=torch.Generator().manual_seed(seed)).tolist()
    start = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=1))
    return (time.perf_counter() - start) * 1e3


SUBSETS = (("none",), ("qkv_proj",), ("o_proj",), ("gate_up_proj",), ("down_proj",), ("lm_head",),
           ("o_proj", "gate_up_proj"), ("o_proj", "gate_up_proj", "lm_head"), ("qkv_proj", "o_proj", "gate_up_proj"),
           ("o_proj", "gate_up_proj", "down_proj"), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
           ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"))


KERNEL_SHAPES = ((576, 1536), (576, 49152), (1536, 8960), (8960, 1536))  # (in, out)


def kernels(rows: list[int], reps: int = 20) -> list[dict[str, Any]]:
    def ms(f: Any) -> float:
        for _ in range(3):
            f()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            f()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3

    out = []
    for k, n in KERNEL_SHAPES:
        for m in rows:
            g = torch.Generator().manual_seed(m)
            x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            scales = torch.rand(n, generator=g) / 100
            row_major = q.t().contiguous()
            out.append({"in": k, "out": n, "rows": m, "bf16_ms": ms(lambda: F.linear(x, w)),  # noqa: B023
                        "int_mm_row_major_ms": ms(lambda: torch._int_mm(xq, row_major)),  # noqa: B023
                        "int_mm_col_major_ms": ms(lambda: torch._int_mm(xq, q.t())),  # noqa: B023
                        "int8_linear_eager_ms": ms(lambda: int8_linear(x, q, scales))})  # noqa: B023
    return out


def per_linear(model: str | None, windows_n: int, window_tokens: int) -> dict[str, float]:
    llm = LLM(model, enforce_eager=True, enable_prefix_caching=False)
    kinds = [(n.split(".")[-2], m) for n, m in llm.engine.model.named_modules() if isinstance(m, PackedWeight)]
    for _, w in kinds:
        w.int8_copy()
    windows, _ = shakespeare_windows(llm.tokenizer, windows_n, window_tokens)
    out = {}
    for subset in SUBSETS:
        for kind, w in kinds:
            w.int8_active = kind in subset
        out["+".join(subset)] = perplexity(llm, windows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"a path, or one of {', '.join(OFFLINE_GGUFS)}")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chats", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-tokens", type=int, default=256)
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--per-linear", action="store_true", help="the per-linear perplexity study instead (see above)")
    p.add_argument("--kernels", action="store_true", help="the product's kernels timed alone instead (see above)")
    args = p.parse_args()
    model = str(offline_gguf(args.model)) if args.model in OFFLINE_GGUFS else args.model
    if args.kernels:
        report({"machine": machine_info(), "threads": torch.get_num_threads(),
                "kernels": kernels([8, 32, 128, 512])}, args.json)
        return
    if args.per_linear:
        ppl = per_linear(model, args.windows, args.window_tokens)
        report({"machine": machine_info(), "model": model or "bundled", "perplexity": ppl,
                "vs_none": {k: v / ppl["none"] - 1 for k, v in ppl.items()}}, args.json)
        return
    llms = {m: LLM(model, int8_compute=m == "int8 compute", max_num_seqs=max(max(args.batches), args.chats))
            for m in MODES}
    result: dict[str, Any] = {"machine": machine_info(), "model": llms[MODES[0]].engine.model_name,
                              "args": vars(args), "modes": {}}
    for m, llm in llms.items():
        result["modes"][m] = {"packed_max_rows": llm.engine.packed_max_rows,
                              "compile_seconds": llm.engine.compile_seconds,
                              "decode_ms": {str(b): [] for b in args.batches}, "prefill_512_ms": []}
    for r in range(args.rounds):
        for m in rotated(MODES, r):
            row = result["modes"][m]
            for b in args.batches:
                row["decode_ms"][str(b)].append(decode_ms(llms[m].engine, b, 256, 16))
            row["prefill_512_ms"].append(prefill_ms(llms[m], 512, r))
    chats = [[{"role": "user", "content": CHAT[i % len(CHAT)]}] for i in range(args.chats)]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    answers = {m: [o.outputs[0].token_ids for o in llm.chat(chats, greedy)] for m, llm in llms.items()}
    # The yardstick: the default mode's own answers, each chat alone instead of all together
    alone = [llms[MODES[0]].chat([c], greedy)[0].outputs[0].token_ids for c in chats]
    result["bf16_alone_vs_together"] = {
        "greedy_identical": sum(a == b for a, b in zip(answers[MODES[0]], alone)),
        "greedy_prefix_agreement": statistics.mean(common_prefix(a, b) / max(len(a), 1)
                                                   for a, b in zip(answers[MODES[0]], alone))}
    windows, _ = shakespeare_windows(llms[MODES[0]].tokenizer, args.windows, args.window_tokens)
    int8_in_graph(llms["int8 compute"].engine.model)  # from here its eager steps multiply in int8 too
    for m, llm in llms.items():
        row = result["modes"][m]
        ref, own = answers[MODES[0]], answers[m]
        row["greedy_identical"] = sum(a == b for a, b in zip(ref, own))
        row["greedy_prefix_agreement"] = statistics.mean(common_prefix(a, b) / max(len(a), 1) for a, b in zip(ref, own))
        row["perplexity"] = perplexity(llm, windows)
        row["prefill_512_ms_median"] = statistics.median(row["prefill_512_ms"])
        row["decode_ms_median"] = {b: statistics.median(v) for b, v in row["decode_ms"].items()}
    base = result["modes"][MODES[0]]
    for row in result["modes"].values():
        row["perplexity_vs_bf16"] = row["perplexity"] / base["perplexity"] - 1
        row["decode_speedup"] = {b: base["decode_ms_median"][b] / v for b, v in row["decode_ms_median"].items()}
    report(result, args.json)


if __name__ == "__main__":
    main()
