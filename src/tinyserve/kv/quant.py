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
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8")
SCALE_BYTES = 2  # a bf16 scale after the codes


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def row_width(head_dim: int, kv_cache_dtype: str) -> int:
    """Elements in one stored row of one head (codes plus the scale's bytes when quantized)."""
    return head_dim + SCALE_BYTES if kv_cache_dtype == "int8" else head_dim


def pool_dtype(kv_cache_dtype: str, activations: torch.dtype) -> torch.dtype:
    return torch.int8 if kv_cache_dtype == "int8" else activations


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


_SYLVESTER: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _sylvester(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (d, dtype, device)
    s = _SYLVESTER.get(key)
    if s is None:
        s = torch.ones(1, 1)
        while s.shape[0] < d:  # Sylvester's construction: [[S, S], [S, -S]]
            s = torch.cat([torch.cat([s, s], 1), torch.cat([s, -s], 1)], 0)
        s = s.to(dtype=dtype, device=device)
        # Kept only when made eagerly: one made while the compiled step is traced is a fake tensor
        # (a constant of that graph), which an eager step must never pick up.
        if not torch.compiler.is_compiling():
            _SYLVESTER[key] = s
    return s


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x S over the last dim, S the Sylvester-Hadamard matrix of +-1 (exact in any dtype, one matmul in
    x's own): S = sqrt(D) H with H orthonormal, so (qS).(kS) = D (q.k) and a reader divides its
    attention scale by D. head_dim must be a power of two (64 and 128 in the models here)."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the int8 KV cache needs a power-of-two head_dim, got {d}")
    return x @ _sylvester(d, x.dtype, x.device)
