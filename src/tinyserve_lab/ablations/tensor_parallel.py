"""Tensor parallelism on this machine: exactness, step time, and what the collectives cost.

- exactness: greedy answers at TP=2 vs TP=1 (both eager) in fp32, token for token; with `--bf16-prompts`,
  how far bf16 drifts (greedy continuations, and log-probabilities teacher-forced on TP=1's text);
- speed: a pure decode step at each `--batches` size (`tinyserve profile`'s timing, through the engine's
  own steps, so the workers run them too) for TP=1 as served (compiled step), TP=1 eager and TP=2 (eager:
  the compiled step has no collectives), in interleaved rounds, in `--dtype`;
- communication: for TP=2, rank 0's collectives per step (calls, bytes, seconds inside them) over the
  timed steps. Rank 0's seconds include waiting for the slower rank (the uneven head split makes one).
  They go through shared memory where the ranks can (parallel/shm.py); `TINYSERVE_TP_ALLREDUCE=gloo` in
  the environment keeps them on gloo (one process holds one TP engine: the two paths are two runs).

    .venv/bin/python -m tinyserve_lab.ablations.tensor_parallel --json docs/results/tp/bundled.json
    .venv/bin/python -m tinyserve_lab.ablations.tensor_parallel --model qwen2.5-coder-0.5b --json ...
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from tinyserve import LLM, SamplingParams
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve_lab.ablations import report, rotated
from tinyserve_lab.datasets import CHAT
from tinyserve_lab.env_info import machine_info
from tinyserve_lab.offline_models import OFFLINE_GGUFS, offline_gguf
from tinyserve_lab.profile import drain, finish_prefill, make_prompts, start_greedy

CONFIGS: dict[str, dict[str, Any]] = {"tp1 compiled": dict(), "tp1 eager": dict(enforce_eager=True),
                                      "tp2": dict(tensor_parallel_size=2)}


def greedy(model: str | None, tp: int, prompts: list[str], tokens: int) -> list[list[int]]:
    llm = LLM(model=model, dtype="float32", enforce_eager=True, tensor_parallel_size=tp)
    try:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                        SamplingParams(max_tokens=tokens, temperature=0))
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.close()


def teacher_forced(llm: LLM, ids: list[list[int]]) -> list[tuple[float, int]]:
    """(logprob of the actual token, top-1 token) at every position after the first."""
    outs = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    rows = []
    for o, seq in zip(outs, ids):
        assert o.prompt_logprobs is not None  # asked for
        for pos, d in enumerate(o.prompt_logprobs[1:], start=1):
            assert d is not None  # only the first position has none
            rows.append((d[seq[pos]].logprob, max(d.items(), key=lambda kv: kv[1].logprob)[0]))
    return rows


def bf16_drift(model: str | None, prompts: list[str], tokens: int) -> dict[str, Any]:
    """TP=2 against TP=1 in bf16: greedy continuations, then both teacher-forced on TP=1's greedy text."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    one = LLM(model=model, dtype="bfloat16", enforce_eager=True)
    outs = one.generate(prompts, params)
    ids = [o.prompt_token_ids + o.outputs[0].token_ids for o in outs]
    a = teacher_forced(one, ids)
    one.close()
    two = LLM(model=model, dtype="bfloat16", tensor_parallel_size=2)
    same = sum(x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(outs, two.generate(prompts, params)))
    b = teacher_forced(two, ids)
    two.close()
    diffs = [abs(x[0] - y[0]) for x, y in zip(a, b)]
    return {"greedy_identical": f"{same}/{len(prompts)}", "positions": len(diffs),
            "mean_abs_dlogprob": sum(diffs) / len(diffs), "max_abs_dlogprob": max(diffs),
            "top1_agreement": sum(x[1] == y[1] for x, y in zip(a, b)) / len(a)}


def timed_decode(engine: LLMEngine, batch: int, context: int, steps: int) -> tuple[float, dict[str, float] | None]:
    """ms per pure decode step (as `tinyserve profile` times it), and rank 0's collectives over those
    steps alone (None without tensor parallelism)."""
    # Threads are per process, and each engine set its own count when built (a TP rank: a share of the cores).
    assert engine.config.num_threads is not None
    torch.set_num_threads(engine.config.num_threads)
    start_greedy(engine, make_prompts(engine.model_config.vocab_size, batch, context, 0), steps + 2)
    finish_prefill(engine)
    engine.step()
    stats = engine.ranks.tp.stats if engine.ranks else None
    before = (stats.calls, stats.bytes, stats.seconds) if stats else (0, 0, 0.0)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - t) / steps * 1e3
    comm = None
    if stats:
        calls = stats.calls - before[0]
        comm = {"calls_per_step": calls / steps, "bytes_per_call": (stats.bytes - before[1]) / calls,
                "us_per_call": (stats.seconds - before[2]) / calls * 1e6}
    drain(engine)
    return ms, comm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=f"default: the bundled model; or one of {', '.join(OFFLINE_GGUFS)}")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chats", type=int, default=8, help="prompts of the fp32 exactness check (0: skip it)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--bf16-prompts", type=int, default=0, help="bf16 drift of TP=2 from TP=1 on this many prompts")
    ap.add_argument("--only-drift", action="store_true", help="stop after the exactness and drift checks")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = str(offline_gguf(args.model)) if args.model in OFFLINE_GGUFS else args.model
    out: dict[str, Any] = {"machine": machine_info(), "model": args.model or "bundled", "dtype": args.dtype}
    if args.chats:
        prompts = list(CHAT[: args.chats])
        one, two = greedy(model, 1, prompts, args.tokens), greedy(model, 2, prompts, args.tokens)
        out["fp32_greedy_identical"] = f"{sum(a == b for a, b in zip(one, two))}/{len(prompts)}"
        print("fp32 greedy identical:", out["fp32_greedy_identical"], flush=True)
    if args.bf16_prompts:
        out["bf16_drift"] = bf16_drift(model, list(CHAT[: args.bf16_prompts]), 64)
        print("bf16 drift:", out["bf16_drift"], flush=True)
        if args.only_drift:
            report(out, args.json)
            return
    engines = {name: LLM(model=model, dtype=args.dtype, **kw).engine for name, kw in CONFIGS.items()}
    ranks = engines["tp2"].ranks
    out["tp2_collectives_through"] = "shared memory" if ranks and ranks.tp.shm else "gloo"
    batches = [int(b) for b in args.batches.split(",")]
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in engines}
    comm: dict[int, list[dict[str, float]]] = {b: [] for b in batches}
    for r in range(args.rounds):
        for b in batches:
            for name in rotated(list(engines), r):
                ms, c = timed_decode(engines[name], b, args.context, args.steps)
                times[name][b].append(ms)
                if c is not None:
                    comm[b].append(c)
            print(f"round {r} b{b}: " + ", ".join(f"{n} {times[n][b][-1]:.1f} ms" for n in engines), flush=True)
    out["decode_step_ms"] = {n: {b: statistics.median(v) for b, v in per.items()} for n, per in times.items()}
    # per step: an all-reduce after each o_proj and down_proj, one for the embedding, the logits' gather
    out["tp2_collectives"] = {b: {k: statistics.median(c[k] for c in cs) for k in cs[0]} for b, cs in comm.items()}
    for b, c in out["tp2_collectives"].items():
        c["share_of_step"] = c["calls_per_step"] * c["us_per_call"] / 1e3 / out["decode_step_ms"]["tp2"][b]
    for engine in engines.values():
        engine.close()
    report(out, args.json)


if __name__ == "__main__":
    main()
