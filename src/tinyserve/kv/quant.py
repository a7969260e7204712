"""KV cache formats: how one token's K (or V) of one KV head is stored in the pool.

`auto` stores the activations' dtype as is. `int8` stores the head's D values as int8 codes and its
scale (absmax / 127, a bf16) in the same row, in its last two bytes: a row is D + 2 int8, so a pool
is still one tensor per layer for K and one for V, and nothing but the code that writes or reads rows
knows the difference (the block manager, the prefix cache and the compiled step's inputs are the same).
A token then costs D + 2 bytes per head and tensor instead of 2D in bf16: 1.94x the tokens at D = 64.
Per (token, head) scales follow each row's own range. A few outlier channels (Qwen2's K bias, rotated
by RoPE) would still set a K row's scale and leave the other channels a handful of codes, so K rows are
stored rotated by a Hadamard matrix (QuaRot's trick), which spreads any channel's energy over all D;
a reader rotates its queries the same way and attends exactly as before (`rotate`). V has no such
channels and is stored as it is. The pool's dtype says its format: int8 means this layout.

`fp8_e4m3` (vLLM's name) stores each value as one float8_e4m3fn, with a per-tensor scale of 1 (vLLM's
default when no scales are calibrated): a row is D bytes, 2x the tokens of bf16. No per-row scale, no
rotation: E4M3 is a float, every value keeps its own exponent, so a scale would buy range alone, and an
outlier channel costs the others nothing (int8's shared grid is what made those necessary); the outlier
itself is rounded to 2^-4 of its size, which a dot product it dominates feels (the rotated int8 rows
hold such K better; a per-channel K scale would be the next step where that matters). K and V of
the models served here sit far inside E4M3's +-448; values beyond it clamp, and values below its normal
range (2^-6) lose relative precision (subnormals step by 2^-9). A row's precision is 2^-4 of its value.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BYTES = 2  # a bf16 scale after the codes


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def row_width(head_dim: int, kv_cache_dtype: str) -> int:
    """Elements in one stored row of one head (codes plus the scale's bytes when quantized). The engine
    sizes its pool with this first, so a model the int8 format cannot hold is refused there."""
    if kv_cache_dtype != "int8":
        return head_dim
    if head_dim & (head_dim - 1):  # `rotate`'s butterflies halve D down to 1
        raise ValueError(f"kv_cache_dtype int8 needs a power-of-two head_dim; this model's is {head_dim}")
    return head_dim + SCALE_BYTES


def pool_dtype(kv_cache_dtype: str, activations: torch.dtype) -> torch.dtype:
    return {"int8": torch.int8, "fp8_e4m3": FP8}.get(kv_cache_dtype, activations)


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """K or V rows as the fp8 pool stores them: clamped first (an out-of-range cast may not saturate)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def copy_rows(pool: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """pool.index_copy_(0, index, rows), for fp8 pools too: byte views, as CPU torch has no fp8 index_copy_."""
    if is_fp8(pool):
        pool, rows = pool.view(torch.uint8), rows.view(torch.uint8)
    pool.index_copy_(0, index, rows)


def read_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pool rows of any format -> values in `dtype` (a no-op for a pool in the activations' dtype)."""
    return dequantize(rows, dtype) if is_quantized(rows) else rows.to(dtype)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[..., D] floats (already rotated) -> [..., D + 2] int8: codes round(x / scale), then the bf16
    scale's two bytes. The scale is rounded to bf16 before dividing, so codes times the stored scale is
    what a read gives."""
    absmax = x.abs().amax(-1, keepdim=True).float()
    scale = (absmax / 127).to(torch.bfloat16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = (x.float() / safe).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([codes, scale.view(torch.int8)], -1)


def dequantize(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D + 2] int8 rows -> [..., D] in `dtype`."""
    d = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., d:].contiguous().view(torch.bfloat16).float()
    return (rows[..., :d].float() * scale).to(dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x S over the last dim, S the Sylvester-Hadamard matrix of +-1, as the fast Walsh-Hadamard
    transform: log2(D) butterflies of adds and subtracts in fp32, which the compiled step fuses into
    one loop with the quantization (a small GEMM per call cost more than the whole rest of the int8
    path). S = sqrt(D) H with H orthonormal and symmetric: (qS).(kS) = D (q.k), so a reader divides its
    attention scale by D, and rotating twice gives D x. D is a power of two (`row_width` checked it)."""
    d = x.shape[-1]
    y, h = x.float(), 1
    while h < d:
        pairs = y.unflatten(-1, (d // (2 * h), 2, h))
        a, b = pairs.select(-2, 0), pairs.select(-2, 1)
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return y.to(x.dtype)
