"""The KV tiers below the pool (kv/tiers.py), measured in-process on one engine configuration:

- **pressure**: `--in-flight` requests of `--input-len` random tokens and `--output-len` greedy tokens in a
  pool sized for `--fits` of them; preempting by swap vs by recompute, and an unpressured pool as the
  reference: throughput, TTFT/TPOT p50 and p99 of the preempted requests, tokens fed to the model, and
  greedy agreement with the reference (each in the default mode and, with `--batch-invariant`, in the
  mode where a request's tokens cannot depend on its neighbours, so any disagreement is the preemption's);
- **restart**: a `--system-len`-token shared system prompt; the first request's TTFT on a cold engine, on
  the same engine again (the pool's cache), and on a new engine over the same `--kv-offload-path` (a
  restart: the disk tier); the files are in the page cache, as on a machine that served them recently;
- **write-through**: decode throughput with the disk tier on and off (the step's copy out of the pool),
  interleaved.

    .venv/bin/python -m tinyserve_lab.ablations.kv_tiers [--model PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from tinyserve import LLM, SamplingParams
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve_lab.ablations import report
from tinyserve_lab.env_info import machine_info


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def run_batch(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Every prompt queued at once, stepped to the end: per-request latencies, preemptions and tokens."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    fed = 0
    real = engine.runner.execute

    def execute(seqs: Any, num_tokens: Any) -> Any:
        nonlocal fed
        fed += sum(num_tokens)
        return real(seqs, num_tokens)

    engine.runner.execute = execute  # type: ignore[method-assign]
    try:
        start = time.monotonic()
        seqs = [engine.add_request(str(i), p, params)[0] for i, p in enumerate(prompts)]
        while engine.has_unfinished():
            engine.step()
        wall = time.monotonic() - start
    finally:
        del engine.runner.execute
    for i in range(len(prompts)):
        engine.pop_output(str(i))
    preempted = [s for s in seqs if s.num_preemptions]
    ttft = [s.first_token_time - s.arrival_time for s in preempted]  # type: ignore[operator]
    tpot = [(s.finish_time - s.first_token_time) / (output_len - 1) for s in preempted]  # type: ignore[operator]
    return {
        "seconds": wall, "output_tok_s": len(prompts) * output_len / wall, "tokens_fed": fed,
        "preempted_requests": len(preempted), "preemptions": sum(s.num_preemptions for s in seqs),
        "ttft_p50_s": _p(ttft, 50) if ttft else None, "ttft_p99_s": _p(ttft, 99) if ttft else None,
        "tpot_p50_ms": 1e3 * _p(tpot, 50) if tpot else None, "tpot_p99_ms": 1e3 * _p(tpot, 99) if tpot else None,
        "outputs": [s.output_token_ids for s in seqs],
    }


def pressure(model: str | None, args: argparse.Namespace, batch_invariant: bool) -> dict[str, Any]:
    total = args.input_len + args.output_len
    blocks_each = -(-total // 16)
    base = dict(model=model, max_num_seqs=args.in_flight, batch_invariant=batch_invariant,
                enable_prefix_caching=False, max_model_len=total)
    runs: dict[str, Any] = {}
    for name, kw in tqdm([("unpressured", dict(num_kv_blocks=blocks_each * args.in_flight)),
                          ("swap", dict(num_kv_blocks=blocks_each * args.fits, preemption_mode="swap")),
                          ("recompute", dict(num_kv_blocks=blocks_each * args.fits, preemption_mode="recompute"))],
                         desc=f"pressure{' (batch-invariant)' if batch_invariant else ''}"):
        llm = LLM(**base, **kw)
        prompts = _prompts(args.in_flight, args.input_len, llm.engine.model_config.vocab_size, 0)
        runs[name] = run_batch(llm.engine, prompts, args.output_len)
        runs[name]["swap_blocks"] = llm.engine.tiers.stats.traffic["swap", "out"].blocks
        runs[name]["swap_seconds"] = sum(llm.engine.tiers.stats.traffic["swap", w].seconds for w in ("out", "in"))
        # the scheduler's swap-or-recompute inputs, as measured in the run, and what they decided
        per_block, per_token = llm.engine.tiers.swap_seconds_per_block(), llm.engine.scheduler.prefill_seconds_per_token
        runs[name]["swap_ms_per_block"] = per_block and per_block * 1e3
        runs[name]["prefill_ms_per_token"] = per_token and per_token * 1e3
        runs[name]["swap_declined"] = llm.engine.tiers.stats.swap_declined
        del llm
    ref = runs["unpressured"]["outputs"]
    for r in runs.values():
        outs = r.pop("outputs")
        r["identical_requests"] = sum(a == b for a, b in zip(outs, ref))
    return runs


def restart(model: str | None, args: argparse.Namespace) -> dict[str, Any]:
    params = SamplingParams(max_tokens=1, temperature=0)
    with tempfile.TemporaryDirectory() as path:
        first = LLM(model, kv_offload_path=path)
        system = _prompts(1, args.system_len, first.engine.model_config.vocab_size, 1)[0]
        questions = _prompts(3, 16, first.engine.model_config.vocab_size, 2)
        out: dict[str, Any] = {}
        for name, llm, q in (("cold", first, questions[0]), ("same engine (pool)", first, questions[1])):
            start = time.perf_counter()
            o = llm.generate([system + q], params, use_tqdm=False)[0]
            out[name] = {"ttft_s": time.perf_counter() - start, "cached_tokens": o.num_cached_tokens}
        first.engine.close()
        written = first.engine.tiers.stats.traffic["disk", "out"]
        del first
        again = LLM(model, kv_offload_path=path)
        start = time.perf_counter()
        o = again.generate([system + questions[2]], params, use_tqdm=False)[0]
        out["restarted (disk)"] = {"ttft_s": time.perf_counter() - start, "cached_tokens": o.num_cached_tokens}
        loaded = again.engine.tiers.stats.traffic["disk", "in"]
        again.engine.close()
    out["blocks_written"], out["write_copy_s"] = written.blocks, written.seconds
    out["blocks_loaded"], out["load_s"] = loaded.blocks, loaded.seconds
    out["restart_vs_cold"] = out["restarted (disk)"]["ttft_s"] / out["cold"]["ttft_s"]
    return out


def write_through(model: str | None, args: argparse.Namespace, reps: int = 2) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as path:
        engines = {"off": LLM(model), "on": LLM(model, kv_offload_path=path)}
        samples: dict[str, list[float]] = {k: [] for k in engines}
        for rep in tqdm(range(reps), desc="write-through"):
            for name, llm in engines.items():  # interleaved: the machine's noise hits both alike
                prompts = _prompts(16, 128, llm.engine.model_config.vocab_size, 10 + rep)  # new blocks every time
                samples[name].append(run_batch(llm.engine, prompts, 256)["output_tok_s"])
        engines["on"].engine.close()
        return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--fits", type=int, default=8, help="requests the pressured pool holds whole")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which measurements (default: all)")
    args = ap.parse_args()
    result = {"machine": machine_info(), "args": vars(args)}
    for part in args.parts:
        result[part] = PARTS[part](args.model, args)
    report(result, args.json)


PARTS: dict[str, Callable[[str | None, argparse.Namespace], Any]] = {
    "pressure": lambda model, args: pressure(model, args, batch_invariant=False),
    "pressure_batch_invariant": lambda model, args: pressure(model, args, batch_invariant=True),
    "restart": restart,
    "write_through_output_tok_s": write_through,
}


if __name__ == "__main__":
    main()
