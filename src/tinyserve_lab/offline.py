"""`tinyserve bench offline`: batch x input length x output length, our engine next to the naive
transformers `generate` (static batch, left padding) on the same weights, in the same process.

Per point: prefill tok/s (prompt tokens / time until every sequence has its first token), decode
tok/s (tokens generated after that / the rest of the time), end-to-end latency, peak memory
(process RSS on CPU; max allocated on CUDA), KV bytes per token, and the decode phase's achieved
GB/s and GFLOP/s, printed next to the machine's measured ceilings (bench.roofline).
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from tinyserve.config import EngineConfig
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve.engine_args import add_engine_args, engine_config
from tinyserve.sampling import SamplingParams
from tinyserve_lab import roofline
from tinyserve_lab.env_info import run_header, save_json

ENGINES = ("tinyserve", "hf")


@dataclass
class Point:
    engine: str
    batch: int
    input_len: int
    output_len: int
    prefill_s: float
    decode_s: float
    e2e_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_mem_mb: float
    kv_bytes_per_token: int
    decode_gbs: float  # weights + KV read per decode step, over decode time
    decode_gflops: float


class PeakMemory:
    """Peak memory during a block: RSS sampled every 5 ms on CPU, the allocator's peak on CUDA."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        proc = psutil.Process()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)

        self.peak_mb = proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()


def make_prompts(vocab: int, batch: int, input_len: int, seed: int) -> list[list[int]]:
    """Random ordinary token ids (low ids are special tokens in most vocabularies)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, vocab, (batch, input_len), generator=g).tolist()


def run_tinyserve(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> tuple[float, float, int]:
    """Returns (seconds until every sequence has its first token, total seconds, tokens decoded after that)."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    seqs = [s for i, p in enumerate(prompts) for s in engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)]
    start = time.perf_counter()
    prefill_s, tokens_then = None, 0
    while engine.has_unfinished():
        engine.step()
        if prefill_s is None and all(s.output_token_ids for s in seqs):
            prefill_s = time.perf_counter() - start
            tokens_then = sum(len(s.output_token_ids) for s in seqs)
    total = time.perf_counter() - start
    for rid in {s.request_id for s in seqs}:
        engine.pop_output(rid)
    return prefill_s or total, total, sum(len(s.output_token_ids) for s in seqs) - tokens_then


def run_hf(model: Any, prompts: list[list[int]], output_len: int, pad_id: int) -> tuple[float, float, int]:
    """transformers generate on a padded static batch: prefill timed as a 1-token generate."""
    ids = torch.tensor(prompts, device=model.device)  # equal lengths here: no padding needed
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=pad_id)
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        total = time.perf_counter() - t
    return prefill_s, total, len(prompts) * (output_len - 1)


def decode_roofline(n_linear_params: int, weight_bytes: int, kv_bytes: int, batch: int,
                    input_len: int, output_len: int, decode_s: float) -> tuple[float, float]:
    """Achieved GB/s and GFLOP/s of the decode phase: each step reads every weight once and each
    sequence's KV so far; each token costs 2 FLOPs per linear weight."""
    steps = max(output_len - 1, 1)
    avg_ctx = input_len + output_len / 2
    bytes_moved = steps * (weight_bytes + batch * avg_ctx * kv_bytes)
    flops = 2 * n_linear_params * batch * steps
    return bytes_moved / decode_s / 1e9, flops / decode_s / 1e9


def add_offline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--input-lens", type=int, nargs="+", default=[32, 128, 512, 1024])
    p.add_argument("--output-lens", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--seed", type=int, default=0, help="seeds the random prompts (and the engine)")
    p.add_argument("--result-dir", default="docs/results")
    p.add_argument("--label", default="offline")
    # The engine is sized from the grid; these are the knobs left to choose.
    add_engine_args(p, only=("model", "dtype", "device", "max_num_batched_tokens", "quantization", "quant_group_size"),
                    dtype="float32")


def run_offline(args: argparse.Namespace) -> dict[str, Any]:
    grid = list(itertools.product(args.batch_sizes, args.input_lens, args.output_lens))
    max_tokens = max(b * (i + o) for b, i, o in grid)
    engine = LLMEngine(engine_config(
        args, max_num_seqs=max(args.batch_sizes), max_model_len=max(i + o for _, i, o in grid) + 1,
        # Room for the largest point at once: offline numbers should not include preemption.
        num_kv_blocks=-(-max_tokens // EngineConfig.block_size) + max(args.batch_sizes),
    ))
    mc = engine.model_config
    dtype = engine.config.torch_dtype
    kv_bytes = mc.kv_bytes_per_token(dtype)

    hf = None
    if "hf" in args.engines:
        from transformers import AutoModelForCausalLM

        from tinyserve.models.loader import resolve_model

        hf_dir = resolve_model(args.model).hf_directory()
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(args.device).eval()

    console = Console()
    console.print("measuring this machine's ceilings (memory bandwidth, GEMM rate)...")
    ceilings = roofline.measure(args.device)
    console.print(ceilings)
    # Warm-up: first calls pay for allocator growth and kernel selection.
    warm = make_prompts(mc.vocab_size, 2, 16, args.seed)
    run_tinyserve(engine, warm, 4)
    if hf is not None:
        run_hf(hf, warm, 4, pad_id=mc.eos_token_ids[0] if mc.eos_token_ids else 0)

    points: list[Point] = []
    for batch, input_len, output_len in tqdm(grid, desc="offline sweep"):
        prompts = make_prompts(mc.vocab_size, batch, input_len, args.seed)
        for name in args.engines:
            with PeakMemory(args.device) as mem:
                if name == "tinyserve":
                    prefill_s, e2e_s, decoded = run_tinyserve(engine, prompts, output_len)
                else:
                    prefill_s, e2e_s, decoded = run_hf(hf, prompts, output_len, mc.eos_token_ids[0])
            decode_s = max(e2e_s - prefill_s, 1e-9)
            n_linear, weight_bytes = roofline.decode_weights(engine.model, batch)
            if name != "tinyserve":  # transformers: every linear dense in the same dtype
                weight_bytes = n_linear * dtype.itemsize
            gbs, gflops = decode_roofline(n_linear, weight_bytes, kv_bytes, batch, input_len,
                                          output_len, decode_s)
            points.append(Point(
                engine=name, batch=batch, input_len=input_len, output_len=output_len,
                prefill_s=round(prefill_s, 4), decode_s=round(decode_s, 4), e2e_s=round(e2e_s, 4),
                prefill_tok_s=round(batch * input_len / prefill_s, 1),
                decode_tok_s=round(decoded / decode_s, 1),
                peak_mem_mb=round(mem.peak_mb, 1), kv_bytes_per_token=kv_bytes,
                decode_gbs=round(gbs, 2), decode_gflops=round(gflops, 1),
            ))
    result = run_header(
        "tinyserve_lab.offline/1", label=args.label, model=engine.model_name,
        engine_torch_threads=torch.get_num_threads(), ceilings=ceilings,
        config={k: v for k, v in vars(args).items() if k != "func"}, points=[asdict(p) for p in points],
    )
    print_points(console, points, ceilings)
    if args.result_dir:
        console.print(f"wrote {save_json(result, Path(args.result_dir), args.label)}")
    return result


def print_points(console: Console, points: list[Point], ceilings: dict[str, float]) -> None:
    table = Table(title=f"offline sweep (ceilings: {ceilings})")
    for col in ("engine", "batch", "in", "out", "prefill tok/s", "decode tok/s", "e2e s", "peak MB",
                "decode GB/s", "decode GFLOP/s"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(p.engine, str(p.batch), str(p.input_len), str(p.output_len), f"{p.prefill_tok_s:.0f}",
                      f"{p.decode_tok_s:.1f}", f"{p.e2e_s:.2f}", f"{p.peak_mem_mb:.0f}", f"{p.decode_gbs:.1f}",
                      f"{p.decode_gflops:.0f}")
    console.print(table)
