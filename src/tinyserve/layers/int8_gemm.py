"""Int8 products on CPUs with AVX512-VNNI and no AMX: the int8 copies packed once, our kernel multiplies.

`--int8-compute`'s reference product (layers/packed.py:`int8_linear`) is `torch._int_mm` (oneDNN) between
passes that quantize the activations and rescale the int32 result (an [M, N] int32 and fp32 temporaries):
on the EPYC, over the bundled model's shapes at a decode step's 32 rows, 279 GOP/s against our bf16
GEMM's 410. Our kernel (csrc/int8_gemm.cpp) quantizes the rows once, multiplies with `vpdpbusd` (twice
the multiply-adds of `vdpbf16ps`) on weights packed once at load, and rescales in registers: the
reference's bits at 500-800 GOP/s, 1.5-2.3x our bf16 GEMM (`python -m tinyserve_lab.ablations.bf16_gemm
--int8`, docs/REPORT.md V8). Where AMX is present oneDNN runs `_int_mm` on the tiles instead, several
times faster.

A packed copy is a 3-D int8 tensor [N/16, K/4 + 1, 64] (the last line of each 16-row block holds the
rows' code sums, which the kernel needs): `packed.int8_linear` takes either form.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tinyserve import native
from tinyserve.system import cpu_flags

SOURCE = Path(__file__).parent / "csrc" / "int8_gemm.cpp"
LANES = 16  # output rows per block of the layout
QUAD = 4  # K positions per 32-bit lane


def _fake(x, w, w_scales):  # shapes for torch.export
    return x.new_empty(x.shape[0], w.shape[0] * LANES)


OPS = native.NativeOps(SOURCE, {"tinyserve::int8_linear": _fake}, "int8 products run torch._int_mm")


def wanted(device: str | torch.device) -> bool:
    """A CPU with VNNI (and bf16 conversions) whose int8 products do not run on AMX tiles."""
    flags = cpu_flags()
    return (torch.device(device).type == "cpu" and {"avx512_vnni", "avx512_bf16"} <= flags
            and "amx_int8" not in flags)


def prefetch(dtype: torch.dtype, device: str) -> None:
    """Start building the kernel on a thread while the model loads (int8 compute asks for it after; the
    kernel takes bf16 activations only)."""
    if dtype == torch.bfloat16 and wanted(device):
        native.build_in_background(SOURCE)


def fits(rows: int, cols: int) -> bool:
    """Whether an [rows, cols] matrix has the layout's whole blocks (16 rows) and column quads."""
    return rows % LANES == 0 and cols % QUAD == 0


def enabled(device: str | torch.device) -> bool:
    """Whether int8 copies on `device` are packed for the kernel (waits for its build)."""
    return wanted(device) and OPS.available()


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [N/16, K/4 + 1, 64]: per 16 output rows, one line of 16 (row) quads per quad of
    columns, then the 16 rows' sums of codes times 128 as int32 (the kernel's offset for unsigned
    activations)."""
    n, k = q.shape
    blocks = q.contiguous().view(torch.int32).view(n // LANES, LANES, k // QUAD).transpose(1, 2)
    sums = (q.sum(-1, dtype=torch.int32) * 128).view(n // LANES, 1, LANES)
    return torch.cat([blocks, sums], 1).contiguous().view(torch.int8).view(n // LANES, k // QUAD + 1, QUAD * LANES)


def unpack(w: torch.Tensor) -> torch.Tensor:
    """The int8 [N, K] codes of a packed copy."""
    blocks, lines, _ = w.shape
    quads = w[:, : lines - 1].contiguous().view(torch.int32)  # [N/16, K/4, 16]
    return quads.transpose(1, 2).contiguous().view(torch.int8).reshape(blocks * LANES, (lines - 1) * QUAD)


def linear(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """x (quantized per row) times a packed copy, rescaled: x of any leading shape, bf16."""
    y = torch.ops.tinyserve.int8_linear(x.reshape(-1, x.shape[-1]), w, w_scales)
    return y.reshape(*x.shape[:-1], y.shape[-1])
