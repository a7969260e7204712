"""`tinyserve profile`: where a step's time goes.

1. torch.profiler tables (top ops by self time) for a prefill step and for decode steps.
2. The split of an engine step between scheduling, batch packing, the forward pass, sampling and
   postprocessing (detokenization + stop checks), by timing wrappers around those five calls.
3. Roofline: the decode step's achieved GB/s and GFLOP/s next to the machine's measured ceilings.
With `--structured`, every decode request carries a JSON-schema constraint and the split shows the
grammar's mask time (filling and applying the token masks, part of `sample`).
The HTTP share of a serving step is not visible here; compare `bench serve` TPOT with these step
times at the same concurrency for that.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from tinyserve.engine.llm_engine import LLMEngine
from tinyserve.engine_args import add_engine_args, engine_config
from tinyserve.sampling import SamplingParams, StructuredOutputsParams
from tinyserve_lab import roofline
from tinyserve_lab.env_info import run_header, save_json
from tinyserve_lab.offline import make_prompts

PARTS = {  # label -> (owner attribute on the engine, method name)
    "schedule": ("scheduler", "schedule"),
    "pack": ("runner", "prepare"),
    "forward": ("runner", "forward"),
    "sample": ("sampler", "sample"),
    "postprocess": (None, "_append"),
}


class StepTimer:
    """Wraps the engine's five step phases with perf_counter timers (instance attributes only);
    `wrap` adds any other method (a draft model's forward, say)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.device = engine.runner.device
        for label, (owner, name) in PARTS.items():
            self.wrap(getattr(engine, owner) if owner else engine, name, label)

    def wrap(self, obj: Any, name: str, label: str) -> None:
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.totals[label] += time.perf_counter() - t
            self.calls[label] += 1
            return out

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


# At least 64 strings (3+ tokens each): the grammar cannot end before a profiled request has to.
OPEN_SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 64}


def start_greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, structured: bool = False) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=OPEN_SCHEMA) if structured else None)
    for i, p in enumerate(prompts):
        engine.add_request(f"profile-{time.monotonic_ns()}-{i}", p, params)


def decode_ms(engine: LLMEngine, batch: int, context: int, steps: int) -> float:
    """ms per pure decode step: `batch` fresh prompts of `context` tokens, prefilled, one warm-up
    decode, then `steps` timed; the requests are drained afterwards. Prompts that finish their prefill
    early decode while the others prefill (small step budgets): max_tokens leaves room for that, so
    every one of the `batch` rows is still running in the timed steps (checked)."""
    room = engine.config.max_num_batched_tokens - batch  # what a step leaves prefills when all others decode
    if room < 1:
        raise ValueError(f"decode_ms: a step budget of {engine.config.max_num_batched_tokens} tokens cannot "
                         f"prefill beside {batch} decodes")
    prefill_steps = -(-batch * context // room) + 1
    start_greedy(engine, make_prompts(engine.model_config.vocab_size, batch, context, 0), steps + 2 + prefill_steps)
    finish_prefill(engine)
    running = sum(not s.finished for seqs in engine.requests.values() for s in seqs)
    if running != batch:
        raise RuntimeError(f"decode_ms: {running} of {batch} rows left to time (the KV pool too small?)")
    engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - t) / steps * 1e3
    drain(engine)
    return ms


def finish_prefill(engine: LLMEngine) -> None:
    """Step until every prompt is in the KV cache, so what follows measures decode steps only."""
    while any(s.num_computed < s.num_prompt_tokens for seqs in engine.requests.values() for s in seqs):
        engine.step()


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()
    for rid in list(engine.requests):
        engine.pop_output(rid)


def op_table(engine: LLMEngine, steps: int, rows: int) -> tuple[str, float]:
    """Profile `steps` engine steps; returns the top-ops table and the mean wall ms per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.runner.device.type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
    ms = (time.perf_counter() - t) / steps * 1e3
    key = "self_cuda_time_total" if engine.runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows), ms


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context-len", type=int, default=128, help="prompt length before the profiled decode steps")
    p.add_argument("--steps", type=int, default=16, help="decode steps measured per batch size")
    p.add_argument("--rows", type=int, default=12, help="ops shown per profiler table")
    p.add_argument("--result-dir", default="docs/results")
    p.add_argument("--structured", action="store_true", help="a JSON-schema constraint on every decode request")
    # The engine is sized from the batch sizes and prefill length; these are the knobs left to choose.
    add_engine_args(p, only=("model", "dtype", "device", "quantization", "quant_group_size", "attention_backend",
                             "enforce_eager"), dtype="float32")


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    console = Console()
    engine = LLMEngine(engine_config(args, max_num_seqs=max(args.batch_sizes),
                                     max_num_batched_tokens=max(args.prefill_len, 1024)))
    mc, dtype = engine.model_config, engine.config.torch_dtype
    console.print("measuring ceilings...")
    ceilings = roofline.measure(args.device)
    report = run_header("tinyserve.profile/1", model=engine.model_name, dtype=str(dtype),
                        engine_torch_threads=torch.get_num_threads(), ceilings=ceilings, tables={}, split={})
    start_greedy(engine, make_prompts(mc.vocab_size, 1, 16, 0), 4)  # warm-up
    drain(engine)

    # Prefill: one prompt, one step.
    start_greedy(engine, make_prompts(mc.vocab_size, 1, args.prefill_len, 1), 1)
    table, ms = op_table(engine, 1, args.rows)
    drain(engine)
    report["tables"][f"prefill_{args.prefill_len}"] = {"ms_per_step": ms, "table": table}
    console.print(f"[bold]prefill of {args.prefill_len} tokens: {ms:.1f} ms ({args.prefill_len / ms * 1e3:.0f} tok/s)")
    console.print(table)

    timer = StepTimer(engine)
    split_table = Table(title="share of a decode step (%)")
    for col in ("batch", "ms/step", *PARTS, "mask", "GB/s", "GFLOP/s"):
        split_table.add_column(col, justify="right")
    for batch in args.batch_sizes:
        start_greedy(engine, make_prompts(mc.vocab_size, batch, args.context_len, 2), args.steps * 2 + 4,
                     args.structured)
        finish_prefill(engine)
        table, _ = op_table(engine, 2, args.rows)
        timer.reset()
        mask0 = engine.grammars.mask_seconds
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        ms = (time.perf_counter() - t) / args.steps * 1e3
        timer.totals["mask"] = engine.grammars.mask_seconds - mask0
        shares = {k: 100 * v / args.steps / (ms / 1e3) for k, v in timer.totals.items()}
        drain(engine)
        kv_read = batch * (args.context_len + args.steps) * mc.kv_bytes_per_token(dtype)
        n_linear, weight_bytes = roofline.decode_weights(engine.model, batch)
        gbs = (weight_bytes + kv_read) / ms / 1e6
        gflops = 2 * n_linear * batch / ms / 1e6
        report["split"][str(batch)] = {"ms_per_step": ms, "share_pct": shares, "gbs": gbs, "gflops": gflops}
        report["tables"][f"decode_batch{batch}"] = {"table": table}
        console.print(f"[bold]decode at batch {batch} (context {args.context_len}): top ops")
        console.print(table)
        split_table.add_row(str(batch), f"{ms:.1f}", *(f"{shares.get(k, 0):.1f}" for k in (*PARTS, "mask")),
                            f"{gbs:.1f}", f"{gflops:.0f}")
    console.print(split_table)
    console.print(f"ceilings: {ceilings}")
    if args.result_dir:
        stem = f"profile-{dtype}{'-structured' if args.structured else ''}".replace("torch.", "")
        console.print(f"wrote {save_json(report, Path(args.result_dir), stem)}")
    return report
