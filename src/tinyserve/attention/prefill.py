"""Prompt attention on our AVX512-BF16 kernel (csrc/prefill_attention.cpp), for the `paged` back end on
CPUs without AMX (`wanted`).

PyTorch's CPU flash attention ran bf16 prompts at 45-105 GFLOP/s on the EPYC, a fifth to a third of the
bundled model's prefill at 256-512 tokens; the kernel runs the same causal attention at 170-290 GFLOP/s
(2.7-4.3x, `python -m tinyserve_lab.ablations.prefill_attention --kernel`, docs/REPORT.md section FA). It takes
a fresh prompt's K/V as the step computed them and a later chunk's read back from the pool, so prefix-cache
hits and chunked prefills take it too. Built in the background while the model loads (`prefetch`); an
engine asks once whether it loaded and keeps the answer, so every prefill of a process runs the same kernel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tinyserve import native
from tinyserve.system import cpu_flags

SOURCE = Path(__file__).parent / "csrc" / "prefill_attention.cpp"
HEAD_DIMS = (64, 128)


def _fake(q, k, v, scale):  # shapes for torch.compile / export
    return q.new_empty(q.shape)


OPS = native.NativeOps(SOURCE, {"tinyserve::prefill_attention": _fake}, "prompt attention runs SDPA")


def wanted(device: str | torch.device, dtype: torch.dtype) -> bool:
    """A bf16 engine on a CPU with AVX512-BF16 and no AMX. Where AMX is present PyTorch's attention can
    run its products on the tiles, and the kernel has not been measured against that: SDPA stays there,
    as it does where bf16 products are not native."""
    flags = cpu_flags()
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and "avx512_bf16" in flags
            and "amx_bf16" not in flags)


def prefetch(device: str, dtype: torch.dtype) -> None:
    """Start building the kernel on a thread while the model loads."""
    if wanted(device, dtype):
        native.build_in_background(SOURCE)


def usable(q: torch.Tensor) -> bool:
    """Whether these queries can take the kernel (waits for its build the first time it is asked)."""
    return wanted(q.device, q.dtype) and q.shape[-1] in HEAD_DIMS and OPS.available()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [L, H, D] against k, v [S, Hkv, D] (S >= L, the chunk's keys last), query i seeing keys up to
    i + S - L -> [L, H, D]. Strided views are read as they are (the last dimension contiguous)."""
    return torch.ops.tinyserve.prefill_attention(q, k, v, scale)
