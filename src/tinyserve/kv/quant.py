"""KV cache formats: how one token's K (or V) of one KV head is stored in the pool.

`auto` stores the activations' dtype as is. `int8` stores the head's D values as int8 codes and its
scale (absmax / 127, a bf16) in the same row, in its last two bytes: a row is D + 2 int8, so a pool
is still one tensor per layer for K and one for V, and nothing but the code that writes or reads rows
knows the difference (the block manager, the prefix cache and the compiled step's inputs are the same).
A token then costs D + 2 bytes per head and tensor instead of 2D in bf16: 1.94x the tokens at D = 64.
Per (token, head) scales follow each row's own range. A few outlier channels (Qwen2's K bias, rotated
by RoPE) would still set a K row's scale and leave the other channels a handful of codes, so the model
stores K smoothed (SmoothQuant's trick, applied to the q.k product): each K channel divided by its
expected magnitude s and each query channel multiplied by it, which leaves q.k unchanged and gives every
K channel the same share of the row's grid (`k_smoothing`; the model applies it with RoPE, one multiply
per layer, models/llama.py). s comes from the weights alone (no calibration data): the channel's RMS
under random probes of the layer's input, its bias included. V has no such channels and is stored as
it is. The pool's dtype says its format: int8 means this layout.

`fp8_e4m3` (vLLM's name) stores each value as one float8_e4m3fn, with a per-tensor scale of 1 (vLLM's
default when no scales are calibrated): a row is D bytes, 2x the tokens of bf16. No per-row scale, no
smoothing: E4M3 is a float, every value keeps its own exponent, so a scale would buy range alone, and an
outlier channel costs the others nothing (int8's shared grid is what made those necessary); the outlier
itself is rounded to 2^-4 of its size, which a dot product it dominates feels (the smoothed int8 rows
hold such K better; smoothing fp8's K too would be the next step where that matters). K and V of
the models served here sit far inside E4M3's +-448; values beyond it clamp, and values below its normal
range (2^-6) lose relative precision (subnormals step by 2^-9). A row's precision is 2^-4 of its value.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BYTES = 2  # a bf16 scale after the codes
# What the int8 pool's codes mean, for whatever keeps them beyond the process (the disk tier's
# namespace): another smoothing (or the earlier Hadamard rotation) must never read these bytes.
INT8_LAYOUT = "int8-rows-k-smoothed-v1"


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def row_width(head_dim: int, kv_cache_dtype: str) -> int:
    """Elements in one stored row of one head (codes plus the scale's bytes when quantized)."""
    return head_dim + SCALE_BYTES if kv_cache_dtype == "int8" else head_dim


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
    """[..., D] floats (K already smoothed) -> [..., D + 2] int8: codes round(x / scale), then the bf16
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


def k_smoothing(k_rms: torch.Tensor, queries_per_kv: int) -> torch.Tensor:
    """One layer's factors for its q and k heads, [H + H_kv, D], from each K channel's expected magnitude
    [H_kv, D]: query heads are multiplied by s (each by its KV head's), K heads by 1 / s, so q.k is
    unchanged. RoPE rotates channel i with channel i + D/2 by an angle that moves with the position, so
    after it both carry their pair's magnitude: s is the pair's, the same for both (which also makes it
    commute with RoPE). Normalized to a geometric mean of 1 per head (only ratios matter to a row's grid);
    a dead channel is held at 1e-3 of the layer's largest, so 1 / s stays finite."""
    a, b = k_rms.float().chunk(2, -1)
    pair = (a * a + b * b).sqrt()
    s = torch.cat([pair, pair], -1)
    s = s.clamp_min(float(s.amax()) * 1e-3 + 1e-30)
    s = s / s.log().mean(-1, keepdim=True).exp()
    return torch.cat([s.repeat_interleave(queries_per_kv, 0), 1 / s])
