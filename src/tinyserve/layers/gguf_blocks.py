"""GGUF block types in the int4 kernel's form, exactly: each registered type decodes its blocks into
codes q in 0..15 with a scale s and a zero z per 32 weights along K, w = (q - 8) * s + z.

  Q4_0: d * (q - 8)                                    -> s = d,   z = 0
  Q4_1: d * q + m        = (q - 8) * d + (m + 8 d)     -> s = d,   z = m + 8 d
  Q8_0: d * q, q + 128 = 16 h + l (two nibbles)
        = (h - 8) * 16 d + (l - 8) * d + 8 d           -> two int4 halves, their products summed
  Q4_K: per 32 of a 256-block, (d sc) * q - dmin m
        = (q - 8) * (d sc) + (8 d sc - dmin m)         -> s = d sc, z = 8 s - dmin m
        (sc, m: that 32's 6-bit scale and min; the k-quants llama.cpp's Q4_K_M files are mostly made of)

Every other block type is dequantized by `gguf` and served dense (layers/methods.py); serving a new
type packed is one decorated decoder here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tinyserve.layers.formats import GGUFTensor, fp16_field, k_scale_min, nibbles
from tinyserve.registry import Registry


@dataclass(frozen=True)
class Int4Blocks:
    """A GGUF tensor as the int4 kernel's codes [R, K], scales and zeros [R, K/32] (fp32). With
    `halves`, R = 2N: the high nibbles' matrix, then the low ones', whose products are summed."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    halves: bool = False


Decoder = Callable[[torch.Tensor, int, int], Int4Blocks]  # (blocks uint8 [N, row_bytes], N, K)
GGUF_INT4: Registry[Decoder] = Registry("GGUF block type")


def int4_blocks(t: GGUFTensor) -> Int4Blocks:
    n, k = t.shape
    return GGUF_INT4[t.qtype](t.data, n, k)


@GGUF_INT4.register("Q4_0")
def _q4_0(data: torch.Tensor, n: int, k: int) -> Int4Blocks:
    b = data.view(n, k // 32, 18)
    d = fp16_field(b, 0).squeeze(-1)
    return Int4Blocks(nibbles(b[..., 2:], n, k), d, torch.zeros_like(d))


@GGUF_INT4.register("Q4_1")
def _q4_1(data: torch.Tensor, n: int, k: int) -> Int4Blocks:
    b = data.view(n, k // 32, 20)
    d, m = fp16_field(b, 0).squeeze(-1), fp16_field(b, 2).squeeze(-1)
    return Int4Blocks(nibbles(b[..., 4:], n, k), d, m + 8 * d)


@GGUF_INT4.register("Q8_0")
def _q8_0(data: torch.Tensor, n: int, k: int) -> Int4Blocks:
    b = data.view(n, k // 32, 34)
    d = fp16_field(b, 0).squeeze(-1)
    u = (b[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).view(n, k)
    return Int4Blocks(torch.cat([u >> 4, u & 15]), torch.cat([16 * d, d]), torch.cat([torch.zeros_like(d), 8 * d]),
                      halves=True)


@GGUF_INT4.register("Q4_K")
def _q4_k(data: torch.Tensor, n: int, k: int) -> Int4Blocks:
    """d, dmin (fp16), 12 bytes of eight 6-bit scales and mins, then 128 bytes of nibbles: byte j of
    each 32-byte chunk c holds element 64c + j (low) and 64c + 32 + j (high)."""
    b = data.view(n, k // 256, 144)
    d, dmin = fp16_field(b, 0), fp16_field(b, 2)  # [N, K/256, 1]
    sc, mins = k_scale_min(b[..., 4:16])
    scales = (d * sc.float()).view(n, k // 32)  # both products exact in fp32 (11 x 6 bits)
    nibbles = b[..., 16:].unflatten(-1, (4, 1, 32))
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-2).view(n, k)
    return Int4Blocks(q, scales, 8 * scales - (dmin * mins.float()).view(n, k // 32))
