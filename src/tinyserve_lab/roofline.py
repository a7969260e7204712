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


def gemv_bandwidth_gbs(device: str = "cpu", size_mb: int = 256, repeats: int = 5) -> float:
    """Read bandwidth with the access pattern of a decode step: one row times a weight matrix far
    larger than the caches (fp32 GEMV). On the 2-core VMs it streams faster than a tensor sum."""
    k = 2048
    w = torch.randn(size_mb * 2**20 // 4 // k, k, device=device)
    x = torch.randn(1, k, device=device)
    t = _best_time(lambda: torch.nn.functional.linear(x, w), repeats, _sync_for(device))
    return w.numel() * 4 / t / 1e9


def gemm_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, repeats: int = 3) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = _best_time(lambda: a @ b, repeats, _sync_for(device))
    return 2 * n**3 / t / 1e9


def measure(device: str = "cpu") -> dict[str, float]:
    return {
        "mem_read_gbs": round(memory_bandwidth_gbs(device), 1),
        "gemv_read_gbs": round(gemv_bandwidth_gbs(device), 1),
        "gemm_fp32_gflops": round(gemm_gflops(torch.float32, device), 1),
        "gemm_bf16_gflops": round(gemm_gflops(torch.bfloat16, device), 1),
    }


def decode_weights(model: torch.nn.Module, batch: int = 1) -> tuple[int, int]:
    """(parameters, bytes) that one decode step of `batch` sequences multiplies by: every linear, the
    LM head included, in the form its kernel reads at that batch size (packed or dense)."""
    from tinyserve.layers.linear import Linear

    linears = [m for m in model.modules() if isinstance(m, Linear)]
    return sum(m.in_features * m.out_features for m in linears), sum(m.bytes_read(batch) for m in linears)
