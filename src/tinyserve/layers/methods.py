"""The quantization methods: each turns a linear's weight shards into the module that multiplies by them.

Registered by name in layers/__init__.py (`--quantization`). `int8`/`int4` quantize any checkpoint
(round to nearest); `gguf` keeps a GGUF file's blocks packed where the int4 kernel can take them
exactly (layers/gguf_blocks.py); `checkpoint` serves a quantized directory's codes as stored, with no
re-quantization: its int4/int3 groups are already in the kernel's `(q - 8) * s + z` form with bf16
scales, its int8 rows in `_weight_int8pack_mm`'s `q * s`; groups with integer zero points (AutoGPTQ /
AutoAWQ, `--zero int`) are `(q - zq) * s = (q - 8) * s + (8 - zq) * s`. Scales are stored in the
activation dtype (the kernels require it): exact in fp32, rounded to bf16's 8 significant bits
otherwise (docs/REPORT.md measures the cost). Each keeps a dense copy for large steps unless told not to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tinyserve.layers import gguf_native
from tinyserve.layers.formats import GGUFTensor, QuantizedTensor, WeightSource, as_dense, dense_copy
from tinyserve.layers.gguf_blocks import GGUF_INT4, int4_blocks
from tinyserve.layers.linear import Unquantized
from tinyserve.layers.packed import Int4Weight, Int8Weight, pack_int4, quantize_int8


def quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per group: each group's [min, max] spans q = 0..15. Scales and
    zeros are rounded to `dtype` first and q is chosen against the rounded values."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 group size {group} does not divide the input width {k}; try 32")
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8).to(dtype).float()
    zeros = (lo + 8 * scales).to(dtype).float()
    q = ((wg - zeros[..., None]) / scales[..., None] + 8).round().clamp(0, 15)
    return q.view(n, k), scales, zeros


class Int8Method:
    """`--quantization int8`: per-channel weight-only int8 from any checkpoint."""

    name = "int8"
    keeps_stored = False

    def __init__(self, keep_dense: bool = True) -> None:
        self.keep_dense = keep_dense

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        w = torch.cat([as_dense(s).float() for s in shards])
        q, scales = quantize_int8(w, dtype)
        dense = (q.float() * scales[:, None]).to(device=device, dtype=dtype) if self.keep_dense else None
        return Int8Weight(q.to(device), scales.to(device=device, dtype=dtype), dense)


class Int4Method:
    """`--quantization int4`: group-wise asymmetric int4 (RTN) from any checkpoint."""

    name = "int4"
    keeps_stored = False

    def __init__(self, group: int, keep_dense: bool = True) -> None:
        self.group = group
        self.keep_dense = keep_dense

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        w = torch.cat([as_dense(s).float() for s in shards])
        q, scales, zeros = quantize_int4(w, self.group, dtype)
        packed, sz = pack_int4(q, scales, zeros, self.group, dtype, device)
        dense = dense_copy(q, scales, zeros, self.group, dtype, device) if self.keep_dense else None
        return Int4Weight(packed, sz, self.group, False, dense)


def ours_faster(shards: Sequence[WeightSource]) -> bool:
    """Whether our GGUF kernel beats PyTorch's int4 one on these shards: with AVX-512 VNNI, and unless
    they are all Q4_0/Q4_1 (measured: docs/REPORT.md S4)."""
    return gguf_native.vectorized() and not all(isinstance(s, GGUFTensor) and s.qtype in ("Q4_0", "Q4_1")
                                                 for s in shards)


class GGUFMethod:
    """`--quantization gguf`: a GGUF's blocks served packed, each linear on the faster of two kernels:
    PyTorch's int4 kernel for Q4_0/Q4_1 (layers/gguf_blocks.py maps them onto it exactly; our kernel
    decodes these 32-weight blocks one at a time and measured 20-30% slower on the bundled model's
    shapes), our own (layers/gguf_native.py) for every other block type, read as stored (on a CPU
    without AVX-512 VNNI, where ours runs its portable loop, the int4 path throughout).
    `gguf-int4`, and `gguf` where our kernel cannot be built: the int4 kernel where a type maps onto
    it (Q4_0/Q4_1/Q8_0/Q4_K); other block types, and linears whose shards mix Q8_0 with 4-bit types,
    are dequantized."""

    def __init__(self, kernel: str = "best", keep_dense: bool = True) -> None:
        """`kernel`: best (each type on the faster kernel), native (every type on ours: the
        batch-invariant mode's, whose rows never depend on each other), int4 (PyTorch's where it can)."""
        self.kernel = kernel
        self.name = {"best": "gguf", "native": "gguf-native", "int4": "gguf-int4"}[kernel]
        self.keeps_stored = True
        self.keep_dense = keep_dense

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        if self.kernel != "int4" and gguf_native.supports(shards) and (self.kernel == "native" or ours_faster(shards)):
            # the repacked form's fp32 steps differ from the file path's: never in the invariant mode
            weight = gguf_native.gguf_weight([s for s in shards if isinstance(s, GGUFTensor)], dtype, device,
                                             self.keep_dense, repack=self.kernel != "native")
            if weight is not None:
                return weight
        if not all(isinstance(s, GGUFTensor) and s.qtype in GGUF_INT4 for s in shards):
            return Unquantized().pack(shards, dtype, device)
        blocks = [int4_blocks(s) for s in shards if isinstance(s, GGUFTensor)]
        halves = blocks[0].halves
        if any(b.halves != halves for b in blocks):  # Q8_0's two halves cannot share rows with one-matrix types
            return Unquantized().pack(shards, dtype, device)
        parts: list[tuple[torch.Tensor, ...]] = [(b.q, b.scales, b.zeros) for b in blocks]
        if halves:  # [hi_1; hi_2; ...; lo_1; lo_2; ...] so one chunk(2) splits every shard's halves
            parts = [tuple(torch.cat([p[i].chunk(2)[h] for p in parts]) for i in range(3)) for h in (0, 1)]
        q, scales, zeros = (torch.cat([p[i] for p in parts]) for i in range(3))
        packed, sz = pack_int4(q, scales, zeros, 32, dtype, device)
        dense = None
        if self.keep_dense:  # the int4 form dequantizes to the file's values exactly (tests/test_quant.py)
            dense = dense_copy(q, scales, zeros, 32, dtype, device, halves)
        return Int4Weight(packed, sz, 32, halves, dense)


class CheckpointMethod:
    """`--quantization checkpoint`: a quantized directory's weights as stored, no
    re-quantization: "int"/"intz" groups on the int4 kernel, "int8" rows on the int8 kernel, "nf4" on our
    NF4 kernel (layers/nf4.py; dense where it cannot be built). Shards that are not all in one such form
    are dequantized."""

    name = "checkpoint"
    keeps_stored = True

    def __init__(self, keep_dense: bool = True) -> None:
        self.keep_dense = keep_dense

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        forms = {(s.format, s.bits, s.group) if isinstance(s, QuantizedTensor) else None for s in shards}
        form = forms.pop() if len(forms) == 1 else None
        if form is None:
            return Unquantized().pack(shards, dtype, device)
        qs = [s for s in shards if isinstance(s, QuantizedTensor)]
        if form[0] == "nf4":
            from tinyserve.layers.nf4 import nf4_weight  # loads its native kernel: only when a model needs it

            return nf4_weight(qs, dtype, device, self.keep_dense) or Unquantized().pack(shards, dtype, device)
        q, scales = torch.cat([s.q for s in qs]), torch.cat([s.scales for s in qs]).float()
        dense = torch.cat([s.dequantize() for s in qs]).to(device=device, dtype=dtype) if self.keep_dense else None
        if form[0] == "int8":
            return Int8Weight(q.to(device), scales.to(device=device, dtype=dtype), dense)
        zeros = torch.cat([s.kernel_zeros() for s in qs])
        packed, sz = pack_int4(q, scales, zeros, form[2], dtype, device)
        weight = Int4Weight(packed, sz, form[2], False, dense)
        weight.kind = f"int{form[1]}-g{form[2]}" + (" (int4 kernel)" if form[1] != 4 else "")
        return weight


