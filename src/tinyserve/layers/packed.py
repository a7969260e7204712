"""Weight-only quantized weights on packed kernels, each with an optional dense copy for big steps.

Two PyTorch CPU kernels do the work: `aten._weight_int8pack_mm` (int8 per output channel) and
`aten._weight_int4pack_mm_for_cpu` (int4 in groups along K, computing `(q - 8) * s + z`); NF4 runs on
our own (layers/nf4.py). They read a quarter to an eighth of the bytes a 16-bit GEMV reads, so they win
decode steps of a few rows, which are bandwidth bound, and lose to a dense GEMM once a step carries
more rows. So a packed weight may keep a dense copy in the model dtype and switch to it above
`packed_max_rows` rows, set from a start-up measurement (layers/kernel_choice.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PackedWeight(nn.Module):
    """A packed weight plus an optional dense copy for steps with many rows."""

    dense: torch.Tensor | None  # buffers: declared for the type checker (nn.Module.__getattr__ is untyped)

    def __init__(self, dense: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("dense", dense)
        self.packed_max_rows = 1 << 30  # packed kernel for every batch until a measurement says otherwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > self.packed_max_rows:
            return F.linear(x, self.dense)
        return self.packed_mm(x)

    @property
    def dense_weight(self) -> torch.Tensor | None:
        return self.dense

    def bytes_read(self, rows: int) -> int:
        """Weight bytes one product with `rows` rows streams: the dense copy's or the packed ones'."""
        if self.dense is not None and rows > self.packed_max_rows:
            return self.dense.numel() * self.dense.element_size()
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "dense")

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Weight(PackedWeight):
    """int8 [out, in] with one scale per output channel."""

    kind = "int8"
    q: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dense: torch.Tensor | None) -> None:
        super().__init__(dense)
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.q, self.scales)


class Int4Weight(PackedWeight):
    """int4 packed for the CPU kernel, scales and zeros per `group` weights along K. With `halves`
    the packed rows hold two matrices stacked along N whose products are summed (Q8_0's nibbles)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, halves: bool,
                 dense: torch.Tensor | None) -> None:
        super().__init__(dense)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.group = group
        self.halves = halves
        self.kind = f"int4-g{group}" + ("x2" if halves else "")

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)
        if self.halves:
            hi, lo = y.chunk(2, dim=-1)
            return hi + lo
        return y



def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] in 0..15, scales/zeros [N, K/group] -> the kernel's (packed, scales_and_zeros)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()  # [K/group, N, 2]
    return packed.to(device), sz.to(device)
