"""One-off experiments whose numbers docs/REPORT.md cites, kept so those numbers can be rerun.

Each is `python -m tinyserve_lab.ablations.<name> [--help]`; they were scripts/*.py before the lab
was its own package (the old name in brackets). Unlike the `tinyserve bench` instruments, they reach
into the engine's internals (back ends, compiled step, kernels) to switch one thing at a time, so they
follow the engine as it changes, or are dropped once their numbers stop mattering.

- `speed2`            Speed II, each change on and off (eager/compiled x sdpa/paged) [ablate_speed2]
- `decode_attention`  the decode attention path's four versions, whole steps [ablate_decode_attention]
- `paged_decode`      the paged decode kernel alone vs gather + SDPA, one layer per call, hot or from memory,
                      or against another version of its source [bench_paged_decode]
- `eager_ops`         a wave of prefills with the eager steps' native RMSNorm and SiLU * up on and off
- `chunk_attention`   warm prefill over a cached prefix: chunk attention as GEMMs vs SDPA [ablate_chunk_attention]
- `prefill_attention` prompt attention on our AVX512-BF16 kernel vs SDPA / the GEMMs: alone, and prefills in an engine
- `compiled_step`     the compiled decode step: eager, torch.compile (with and without guards), AOTInductor
- `step_thread`       a decode step on the loading thread vs another one [probe_step_thread]
- `linear_kernels`    every linear of a step per mode, kernel and row count: the kernel choice [bench_linear_kernels]
- `gguf_kernel`       every GGUF weight of a decode step per block type: our kernel, PyTorch's int4, dense bf16
- `bf16_gemm`         dense products by row count: ATen vs ours packed once; `--int8`: int8 compute's too
- `batch_invariance`  greedy answers alone vs 32 together, per configuration (`--batch-invariant`'s check and cost)
- `quant_layer_error` one layer's output error after RTN and GPTQ, calibration vs held-out text [quant_layer_error]
- `kv_cache_dtype`    the KV pool's formats (auto, int8, fp8_e4m3): perplexity through the pool, capacity, decode speed
- `grammar_libraries` XGrammar vs llguidance on our tokenizers: set-up, compile, one mask (the choice of library)
- `kv_tiers`          swap vs recompute under memory pressure, the disk tier across a restart, its write cost
- `int8_compute`      `--int8-compute` on and off: decode steps by batch, prefill, perplexity, greedy agreement
- `fp8_head`          FP8 weights' perplexity with the LM head in E4M3 vs kept in bf16
- `tensor_parallel`   TP=2 vs TP=1: fp32 greedy exactness, decode step time, rank 0's collectives per step
- `tp_allreduce`      one all-reduce between two CPU ranks: gloo over the loopback vs shared memory
- `routers`           2 Ray Serve replicas under multi-turn chats, per router: prefix hit rate, TTFT
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """`names` starting at round_index (mod len): interleaved rounds, each variant first in turn, so
    drift of the machine within a round does not always fall on the same variant."""
    k = round_index % len(names)
    return [*names[k:], *names[:k]]


def report(result: dict[str, Any], path: str | None) -> None:
    """Print an ablation's results as JSON, and write them to `path` too when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
