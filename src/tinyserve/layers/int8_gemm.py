"""Int8 products on CPUs with AVX512-VNNI and no AMX: the int8 copies packed once, our kernel multiplies.

Our kernel (csrc/int8_gemm.cpp) quantizes each activation row per block of 64 columns, after multiplying its
columns by the factors the weight was divided by (`column_factors`), multiplies with `vpdpbusd` (twice
the multiply-adds of `vdpbf16ps`) on weights packed once at load, and rescales in registers. Blocked
activations and evened-out weight columns let int8 compute cover all four kinds of a layer here at +0.56%
perplexity on the bundled model (with one scale per token and per output channel qkv_proj and down_proj
alone cost +1.0-1.8%: docs/REPORT.md I8, B8). `reference` is its arithmetic in torch ops:
the kernel gives its bits. Where AMX is present oneDNN runs `torch._int_mm` on the tiles instead, with one
scale per token (layers/packed.py:int8_linear), on the kinds that tolerate it.

A packed copy is a 4-D int8 tensor [N/16, K/64, 17, 64]: per 16 output rows and 64 columns, a line of
the rows' code sums (which the kernel needs) and 16 lines of quads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tinyserve import native
from tinyserve.system import cpu_flags

SOURCE = Path(__file__).parent / "csrc" / "int8_gemm.cpp"
LANES = 16  # output rows per block of the layout
QUAD = 4  # K positions per 32-bit lane
BLOCK = 64  # activation columns per scale
LINES = 1 + BLOCK // QUAD  # per 16 rows and block: the sums line, then the quads


def _fake(x, w, w_scales, cols):  # shapes for torch.export
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
    """Whether an [rows, cols] matrix has the layout's whole blocks (16 rows, 64 columns)."""
    return rows % LANES == 0 and cols % BLOCK == 0


def piece_rows(cols: int) -> int:
    """Rows of a [*, cols] matrix per 1 MB of fp32: the piece the load-time passes over a weight take, so
    their fp32 temporaries stay in cache (a pass over a whole matrix is several times slower)."""
    return max(1, (1 << 18) // cols)


def column_factors(w: torch.Tensor) -> torch.Tensor:
    """fp32 [K]: sqrt of each input column's absmax, mean 1. The weight is divided by them before its rows
    are quantized (its columns evened out: down_proj's heavy ones no longer set a row's scale) and the
    activations multiplied (SmoothQuant's alpha 0.5 with the weight's side only, no calibration data)."""
    amax = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    for part in w.split(piece_rows(w.shape[1])):
        torch.maximum(amax, part.float().abs().amax(0), out=amax)
    c = amax.clamp(min=1e-6).sqrt()
    return c / c.mean()


def enabled(device: str | torch.device) -> bool:
    """Whether int8 copies on `device` are packed for the kernel (waits for its build)."""
    return wanted(device) and OPS.available()


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [N/16, K/64, 17, 64]: per 16 output rows and 64 columns, the 16 rows' sums of codes
    times -128 as int32 (the kernel's offset for unsigned activations, taken back out), then one line of
    16 (row) quads per quad of columns."""
    n, k = q.shape
    rows = q.contiguous().view(n // LANES, LANES, k // BLOCK, BLOCK)
    # Block sums in fp32 (exact: |sum| <= 64 x 128), 1 MB of rows at a time: `sum(dtype=int32)` over the
    # int8 blocks took 3.3 s of the 1.5B's load (cProfile, docs/REPORT.md B8).
    sums = torch.cat([part.float().view(-1, k // BLOCK, BLOCK).sum(-1) for part in q.split(piece_rows(k))])
    lines = torch.empty(n // LANES, k // BLOCK, LINES, LANES, dtype=torch.int32, device=q.device)
    lines[:, :, 0] = (sums.to(torch.int32) * -128).view(n // LANES, LANES, k // BLOCK).transpose(1, 2)
    lines[:, :, 1:] = rows.view(torch.int32).permute(0, 2, 3, 1)  # [N/16, K/64, 16 quads, 16 rows]
    return lines.view(torch.int8).view(n // LANES, k // BLOCK, LINES, QUAD * LANES)


def unpack(w: torch.Tensor) -> torch.Tensor:
    """The int8 [N, K] codes of a packed copy."""
    blocks, nb = w.shape[:2]
    quads = w[:, :, 1:].contiguous().view(torch.int32)  # [N/16, K/64, 16 quads, 16 rows]
    return quads.permute(0, 3, 1, 2).contiguous().view(torch.int8).reshape(blocks * LANES, nb * BLOCK)


def reference(x: torch.Tensor, q: torch.Tensor, w_scales: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in torch ops, x [M, K] bf16 by codes q [N, K]: each block's products are
    exact integers (|sum| < 2^24, so fp32 holds them), then summed in block order, each times its scale."""
    xf = (x.float() * cols).view(x.shape[0], -1, BLOCK).transpose(0, 1)  # [K/64, M, 64]
    scales = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    xq = (xf / scales).round()
    sums = torch.bmm(xq, q.float().view(q.shape[0], -1, BLOCK).permute(1, 2, 0))  # [K/64, M, N]
    total = torch.zeros_like(sums[0])
    for s, xs in zip(sums, scales):
        total = total + s * xs
    return (total * w_scales).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x (times cols, quantized per row and block) times a packed copy, rescaled: x of any leading shape, bf16."""
    y = torch.ops.tinyserve.int8_linear(x.reshape(-1, x.shape[-1]), w, w_scales, cols)
    return y.reshape(*x.shape[:-1], y.shape[-1])
