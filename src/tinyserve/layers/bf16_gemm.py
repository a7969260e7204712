"""Dense bf16 products on CPUs with AVX512-BF16 and no AMX: weights packed once, our kernel multiplies.

ATen's bf16 `F.linear` runs oneDNN, which reorders the weight into its blocked layout on every call and
blocks poorly for a decode step's 9-64 rows: the bundled model's 8- to 32-row products ran at 130-300
GFLOP/s against the 410-430 of a 2048^3 bf16 GEMM on this EPYC. Packed once at load into the layout `vdpbf16ps` reads
(csrc/bf16_gemm.cpp), the same products run at ~400-440 (`python -m tinyserve_lab.ablations.bf16_gemm`,
docs/REPORT.md section BG). Where AMX is present oneDNN multiplies on the tiles, several times faster:
there weights stay as they are.

A packed weight is a 3-D tensor [N/16, K/2, 32], so the layout travels with the tensor: `linear` and
`embedding` take either form, and nothing else needs to know which it holds. Same bytes, no copy kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyserve import native
from tinyserve.system import cpu_flags

SOURCE = Path(__file__).parent / "csrc" / "bf16_gemm.cpp"
LANES = 16  # output rows per block of the layout


def _fake(x, w):  # shapes for torch.export
    return x.new_empty(x.shape[0], w.shape[0] * LANES)


OPS = native.NativeOps(SOURCE, {"tinyserve::bf16_linear": _fake}, "dense bf16 products run ATen's F.linear")


def wanted(dtype: torch.dtype, device: str | torch.device) -> bool:
    """bf16 on a CPU whose vector units have bf16 dot products and which has no AMX tiles."""
    flags = cpu_flags()
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and "avx512_bf16" in flags
            and "amx_bf16" not in flags)


def prefetch(dtype: torch.dtype, device: str) -> None:
    """Start building the kernel on a thread where `pack_model` will want it, to overlap loading the model."""
    if wanted(dtype, device):
        native.build_in_background(SOURCE)


def fits(rows: int, cols: int) -> bool:
    """Whether an [rows, cols] matrix has the layout's whole blocks (16 rows) and column pairs."""
    return rows % LANES == 0 and cols % 2 == 0


def packable(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.dtype == torch.bfloat16 and fits(*w.shape)


def enabled(dtype: torch.dtype, device: str | torch.device) -> bool:
    """Whether dense matrices of `dtype` on `device` are packed for the kernel (waits for its build)."""
    return wanted(dtype, device) and OPS.available()


def pack(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] -> [N/16, K/2, 32]: for each 16 output rows, one line of 16 (row) pairs per pair of columns.
    Into `out` where given. A pair is one int32, so this is a transpose of 16 x K/2 int32 per block, done
    a few MB at a time (a 150k-row head: 0.17 s, against 0.33 s for the bf16 permute in one piece)."""
    n, k = w.shape
    src = w.contiguous().view(torch.int32).view(n // LANES, LANES, k // 2)
    dst = torch.empty(n // LANES, k // 2, LANES, dtype=torch.int32) if out is None else out.view(torch.int32)
    step = max(1, (4 << 20) // (LANES * k * 2))  # blocks per 4 MB
    for b in range(0, n // LANES, step):
        dst[b : b + step].copy_(src[b : b + step].transpose(1, 2))
    return dst.view(torch.bfloat16).view(n // LANES, k // 2, 2 * LANES)


def unpack(w: torch.Tensor) -> torch.Tensor:
    """The [N, K] matrix of either form (a packed one as a new tensor): `pack`'s int32 transpose undone, a
    few MB at a time (the 1.5B's four int8-compute kinds: 2.6 s of its load as one bf16 permute each)."""
    if w.dim() == 2:
        return w
    blocks, pairs, _ = w.shape
    src = w.view(torch.int32)  # [blocks, pairs, 16 rows]
    dst = torch.empty(blocks, LANES, pairs, dtype=torch.int32, device=w.device)
    step = max(1, (4 << 20) // (LANES * pairs * 4))  # blocks per 4 MB
    for b in range(0, blocks, step):
        dst[b : b + step].copy_(src[b : b + step].transpose(1, 2))
    return dst.view(torch.bfloat16).view(blocks * LANES, pairs * 2)


def shape(w: torch.Tensor) -> tuple[int, int]:
    """[N, K] of either form."""
    return (w.shape[0] * LANES, w.shape[1] * 2) if w.dim() == 3 else (w.shape[0], w.shape[1])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T for a weight of either form; a packed one takes x of any leading shape."""
    if w.dim() == 2:
        return F.linear(x, w)
    y = torch.ops.tinyserve.bf16_linear(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a table of either form (a tied embedding shares the LM head's packed table)."""
    if table.dim() == 2:
        return F.embedding(ids, table)
    blocks, pairs, _ = table.shape
    rows = table.view(blocks, pairs, LANES, 2)[ids // LANES, :, ids % LANES]  # [*ids, K/2, 2]
    return rows.reshape(*ids.shape, pairs * 2)


def packed(model: nn.Module) -> bool:
    """Whether any dense matrix of `model` is packed (its products run on our kernel)."""
    return any(isinstance(w := getattr(m, "dense_weight", None), torch.Tensor) and w.dim() == 3
               for m in model.modules())


def pack_model(model: nn.Module, dtype: torch.dtype, device: str | torch.device) -> int:
    """Pack every dense bf16 weight matrix of `model` (linears and the dense copies of quantized ones)
    where `wanted` and the kernel builds; a tensor shared by two modules (a tied embedding and head)
    is packed once and shared as packed. Returns how many were packed."""
    if not enabled(dtype, device):
        return 0

    def key(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:  # a shared table is one storage, not one object
        return t.data_ptr(), tuple(t.shape)

    # the weight modules' dense matrices (DenseWeight's, a PackedWeight's copy for large steps)
    tables = (getattr(m, "dense_weight", None) for m in model.modules())
    targets = {key(w) for w in tables if isinstance(w, torch.Tensor) and packable(w)}
    holders: dict[tuple[int, tuple[int, ...]], list[tuple[dict[str, Any], str]]] = {}
    for m in model.modules():  # every holder of a target: the tied embedding shares the head's table
        stores: tuple[dict[str, Any], ...] = (m._parameters, m._buffers)
        for store in stores:
            for name, t in store.items():
                if t is not None and key(t) in targets:
                    holders.setdefault(key(t), []).append((store, name))
    for places in holders.values():  # one at a time: the old matrix is freed before the next is packed
        store, name = places[0]
        new = pack(store[name])
        for store, name in places:
            store[name] = nn.Parameter(new, requires_grad=False) if isinstance(store[name], nn.Parameter) else new
    return len(holders)
