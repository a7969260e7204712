"""NF4 weights served packed, through our own kernel (csrc/nf4_linear.cpp).

PyTorch has no NF4 matmul, and a table lookup in eager PyTorch costs more than the dense product it
replaces, so without a kernel an NF4 checkpoint can only be decoded to a dense matrix at load: 4-bit
on disk, 16-bit in memory and at bf16's speed. The kernel reads the codes two per byte plus one scale
per group, as int4 does (the same bytes as int4 at the same group size, less its zero points), and
decodes them in registers. Like every `PackedWeight`, an `NF4Weight` keeps a dense copy for steps
with more rows than the measured crossover. Without a compiler it falls back to the dense decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tinyserve import native
from tinyserve.layers.formats import NF4_CODEBOOK, QuantizedTensor
from tinyserve.layers.packed import PackedWeight

SOURCE = Path(__file__).parent / "csrc" / "nf4_linear.cpp"
BLOCK = 32  # the kernel's unit along K: 16 bytes, weight i in the low nibble, i + 16 in the high one


def _fake(x, codes, scales, codebook, group):  # shapes for torch.export
    return x.new_empty(x.shape[0], codes.shape[0])


OPS = native.NativeOps(SOURCE, {"tinyserve::nf4_linear": _fake}, "NF4 checkpoints are decoded to dense weights instead")


def kernel_available() -> bool:
    """Whether the kernel is built and loaded; False (and one log line) where it cannot be built."""
    return OPS.available()


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, K] (K a multiple of 32) -> the kernel's bytes [N, K/2]."""
    n, k = q.shape
    blocks = q.to(torch.uint8).view(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


class NF4Weight(PackedWeight):
    """NF4 codes packed for csrc/nf4_linear.cpp, one scale per `group` weights along K."""

    codes: torch.Tensor
    scales: torch.Tensor
    codebook: torch.Tensor

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group: int, dense: torch.Tensor | None) -> None:
        super().__init__(dense)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("codebook", NF4_CODEBOOK.clone())
        self.group = group
        self.kind = f"nf4-g{group}"

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tinyserve.nf4_linear(x, self.codes, self.scales, self.codebook, self.group)


def nf4_weight(shards: Sequence[QuantizedTensor], dtype: torch.dtype, device: torch.device,
               keep_dense: bool) -> NF4Weight | None:
    """The shards (one NF4 group size) as one packed weight; None where the kernel cannot serve them
    (no compiler, a group that is not a multiple of 32, not a CPU)."""
    group = shards[0].group
    if device.type != "cpu" or group % BLOCK or not kernel_available():
        return None
    # fp32 scales: exact whatever the file held, and 4 bytes per group, as int4's bf16 scale + zero
    scales = torch.cat([s.scales for s in shards]).float()
    codes = pack_codes(torch.cat([s.q for s in shards]))
    dense = torch.cat([s.dequantize() for s in shards]).to(device=device, dtype=dtype) if keep_dense else None
    return NF4Weight(codes, scales.contiguous(), group, dense)
