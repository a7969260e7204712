"""GGUF weights served as the file stores them, through our own kernel (csrc/gguf_linear.cpp).

PyTorch's packed kernels take int4 groups and int8 rows, so only some GGUF block types map onto them
(layers/gguf_blocks.py) and the rest, among them the Q6_K that a Q4_K_M file uses for its output
layer and half its `attn_v` and `ffn_down`, would be served as dense 16-bit weights, the largest
share of a decode step's bytes. This kernel reads every common block type (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q4_K, Q5_K, Q6_K) as the file stores them: no repacking at load, and a step streams
the file's bytes per weight. A linear whose shards mix types (q/k/v in a Q4_K_M file) is one call.

Accuracy: weights are the file's exactly; activations are rounded to int16 per group of 32 or 256 with
a power-of-two step (exact for every bf16 value within 2^7 of its group's largest), and the products
are summed exactly in int32 — closer to the dense product than bf16 activations' own rounding.
`ERROR_BOUND` is the bound tests/test_gguf_native.py checks against `gguf`'s dequantization.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tinyserve import native
from tinyserve.layers.formats import GGUFTensor
from tinyserve.layers.packed import PackedWeight
from tinyserve.system import cpu_flags

SOURCE = Path(__file__).parent / "csrc" / "gguf_linear.cpp"
# GGML's type ids (the kernel's `qtypes`) for the block types it reads.
QTYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
# |y - x W^T| <= ERROR_BOUND * sum_k |w_k| * max|x| over the activation group (int16 rounding: 2^-15
# of the group's magnitude, halved), plus fp32 accumulation.
ERROR_BOUND = 2.0**-15


def _fake(x, weights, qtypes):  # shapes for torch.export
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


OPS = native.NativeOps(SOURCE, {"tinyserve::gguf_linear": _fake},
                       "GGUF blocks go to PyTorch's int4 kernel or dense instead")


def kernel_available() -> bool:
    """Whether the kernel is built and loaded; False (and one log line) where it cannot be built."""
    return OPS.available()


def supports(shards: Sequence[object]) -> bool:
    return all(isinstance(s, GGUFTensor) and s.qtype in QTYPES for s in shards)


def vectorized() -> bool:
    """Whether this CPU gets the kernel's AVX-512 VNNI path (it is built with -march=native); elsewhere
    it runs a portable scalar loop, correct but slower than PyTorch's int4 kernel."""
    return {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()


class GGUFWeight(PackedWeight):
    """A linear's GGUF tensors as stored, one buffer per shard (uint8 [N_i, row_bytes_i])."""

    def __init__(self, shards: Sequence[GGUFTensor], dense: torch.Tensor | None) -> None:
        super().__init__(dense)
        self.qtypes = [QTYPES[s.qtype] for s in shards]
        self.names = []
        for i, s in enumerate(shards):
            self.register_buffer(f"blocks{i}", s.data)
            self.names.append(f"blocks{i}")
        types = sorted({s.qtype for s in shards})
        self.kind = "gguf-" + "+".join(types)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [getattr(self, n) for n in self.names]
        return torch.ops.tinyserve.gguf_linear(x, blocks, self.qtypes)


def gguf_weight(shards: Sequence[GGUFTensor], dtype: torch.dtype, device: torch.device,
                keep_dense: bool) -> GGUFWeight | None:
    """The shards as one weight on the kernel; None where it cannot serve them (not a CPU, no compiler)."""
    if device.type != "cpu" or not kernel_available():
        return None
    dense = torch.cat([dequantize_into(s, dtype) for s in shards]) if keep_dense else None
    return GGUFWeight([GGUFTensor(s.qtype, s.data.contiguous(), s.shape) for s in shards], dense)


def dequantize_into(t: GGUFTensor, dtype: torch.dtype, chunk: int = 4096) -> torch.Tensor:
    """`t` dequantized into `dtype`, `chunk` rows at a time (a 150k-row head is ~1 GB in fp32)."""
    rows, cols = t.shape
    out = torch.empty(rows, cols, dtype=dtype)
    for r in range(0, rows, chunk):
        e = min(r + chunk, rows)
        out[r:e] = GGUFTensor(t.qtype, t.data[r:e], (e - r, cols)).dequantize()
    return out
