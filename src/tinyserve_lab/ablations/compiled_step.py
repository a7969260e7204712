"""The compiled decode step, three ways, interleaved on one engine (REPORT S3): eager; torch.compile with
the options the engine used until 2026-12-06 (freezing + cpp_wrapper, the row count an unbacked size
ranged to its regime), dynamo's guards checked at every step; and the AOTInductor packages the
engine runs now (no guards, no Python). Prints the build times, `--rounds` rounds of ms per step for
each batch size, and for each compiled variant the position at which its greedy tokens first differ
from eager's over a few prompts (64 = never).

The engine's former step also skipped most guards once warmed (`skip_guard_eval_unsafe`); rebuilt
here, that stance refused every step as a recompilation (its unbacked-bounds guard), so it is left
out: the old engine itself is measured against the new one end to end (scripts/serve_ab.sh).

    .venv/bin/python -m tinyserve_lab.ablations.compiled_step [--rounds 4] [--steps 40] [--batch 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from tinyserve import LLM, SamplingParams
from tinyserve.worker.compiled import CompiledDecode, decode_forward, dummy_decode_inputs
from tinyserve_lab.ablations import rotated
from tinyserve_lab.profile import decode_ms


class TorchCompileDecode:
    """torch.compile'd `decode_forward` with the engine's former options, a graph per regime of the same
    rows as `step`'s packages: the measured alternative."""

    def __init__(self, step: CompiledDecode) -> None:
        self.step = step
        self.fn = torch.compile(decode_forward, fullgraph=True, dynamic=False,
                                options={"freezing": True, "cpp_wrapper": True})

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
                 slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        from torch._dynamo.decorators import mark_unbacked

        s = self.step
        if tables.shape[1] < s.MIN_TABLE_WIDTH:
            tables = torch.nn.functional.pad(tables, (0, s.MIN_TABLE_WIDTH - tables.shape[1]))
        if s.two_row_minimum and ids.shape[0] == 1:
            doubled = [torch.cat([t, t]) for t in (ids, pos, slots, tables, lens)]
            return self(doubled[0], doubled[1], kv, *doubled[2:])[:1]
        lo, hi = next((lo, hi) for lo, hi in s.regimes if lo <= ids.shape[0] <= hi)
        for t in (ids, pos, slots, tables, lens):
            mark_unbacked(t, 0, shape_id="rows", min=lo, max=hi if hi < s.regimes[-1][1] else None)
        torch._dynamo.maybe_mark_dynamic(tables, 1)
        return self.fn(s.model, ids, pos, kv, slots, tables, lens, s.block_size)

    def warm_up(self, kv: list[tuple[torch.Tensor, torch.Tensor]], index_dtype: torch.dtype, scratch: int) -> float:
        start = time.perf_counter()
        for lo, _ in self.step.regimes:
            for rows in {lo, lo + 1}:
                a = dummy_decode_inputs(rows, kv[0][0].device, index_dtype, scratch, self.step.block_size)
                self(a[0], a[1], kv, *a[2:])
        return time.perf_counter() - start


def agreement(llm: LLM, prompts: list[str], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    t = time.perf_counter()
    llm = LLM(dtype=args.dtype, compile="blocking")  # the AOTInductor packages (built or loaded)
    engine = llm.engine
    runner = engine.runner
    aoti = runner.compiled
    if aoti is None:
        raise SystemExit("the engine runs eager here: nothing compiled to compare")
    out: dict[str, Any] = {"dtype": str(engine.config.torch_dtype), "quantization": engine.quantization,
                           "regimes": aoti.regimes, "aoti_start_s": round(time.perf_counter() - t, 1)}
    variants: dict[str, Any] = {"eager": None, "aoti": aoti}
    compiled = TorchCompileDecode(aoti)
    out["torch.compile_compile_s"] = round(compiled.warm_up(runner.kv_caches, engine.attention.index_dtype,
                                                             runner.scratch_block), 1)
    variants["torch.compile"] = compiled
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    runner.compiled = None
    ref = agreement(llm, prompts, 64)
    out["greedy_tokens_equal_to_eager"] = {}
    for name in ("aoti", "torch.compile"):
        runner.compiled = variants[name]
        got = agreement(llm, prompts, 64)
        out["greedy_tokens_equal_to_eager"][name] = [
            next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ref, got)]
    ms: dict[str, dict[int, list[float]]] = {n: {b: [] for b in args.batch} for n in variants}
    for r in range(args.rounds):
        for name in rotated(list(variants), r):
            runner.compiled = variants[name]
            for b in args.batch:
                ms[name][b].append(round(decode_ms(engine, b, 128, args.steps), 2))
        print(json.dumps({n: {b: v[-1] for b, v in per.items()} for n, per in ms.items()}), flush=True)
    runner.compiled = aoti
    out["ms_per_step"] = ms
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
