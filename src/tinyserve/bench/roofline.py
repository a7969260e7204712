"""This machine's ceilings, measured once per run: memory read bandwidth and GEMM rate.

Achieved GB/s and FLOP/s only mean something next to what the machine can do, and datasheet
numbers lie on shared cloud VMs, so we measure: a large tensor sum (read-bound) and square
matmuls in fp32 and bf16 (compute-bound).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _sync_for(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def memory_bandwidth_gbs(device: str = "cpu", size_mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: one pass over a buffer far larger than the caches."""
    x = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=device)
    t = _best_time(lambda: x.sum(), repeats, _sync_for(device))
    return x.numel() * 4 / t / 1e9


def gemm_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, repeats: int = 3) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = _best_time(lambda: a @ b, repeats, _sync_for(device))
    return 2 * n**3 / t / 1e9


def measure(device: str = "cpu") -> dict[str, float]:
    return {
        "mem_read_gbs": round(memory_bandwidth_gbs(device), 1),
        "gemm_fp32_gflops": round(gemm_gflops(torch.float32, device), 1),
        "gemm_bf16_gflops": round(gemm_gflops(torch.bfloat16, device), 1),
    }


def decode_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes) that one decode step multiplies by: every linear, plus the embedding
    when it doubles as the LM head (tied); an untied head is already one of the linears."""
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if getattr(model, "lm_head", None) is None:
        linears.append(model.get_parameter("embed_tokens.weight"))
    return sum(w.numel() for w in linears), sum(w.numel() * w.element_size() for w in linears)
