"""Weight-only int4 products in Triton: the GPU's counterpart of PyTorch's CPU int4 kernel (layers/packed.py).

The same math as every int4 weight here, `(q - 8) * s + z` per group of `group` weights along K
(formats.dequant_groups), so whatever the CPU kernel serves (RTN int4, Q4_0/Q4_1 blocks, checkpoint
groups) this one serves from the same codes, scales and zeros. The codes are repacked at load into the simplest layout
a GPU reads in whole rows: uint8 [N, K / 2], weight 2j of a row in byte j's low nibble and 2j + 1 in
its high one; scales and zeros stay [N, K / group] in the activation dtype. One program computes a
[BLOCK_M, BLOCK_N] tile of the output, one group of K per step: it unpacks the group's codes,
dequantizes them in registers (the weight is never materialized) and multiplies on tl.dot.
Nothing is tuned yet: the tile sizes are plain choices, with no split-K for batch-1 products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from tinyserve.layers.packed import PackedWeight
from tinyserve.triton_dot import dot_operands

BLOCK_N = 64  # output columns per program


@triton.jit
def _int4_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,  # inner dims contiguous
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rk = tl.arange(0, GROUP)
    rb = tl.arange(0, GROUP // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(0, K // GROUP):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + g * GROUP + rk[None, :], mask=m_ok[:, None], other=0.0)
        packed = tl.load(w_ptr + rn[:, None] * stride_wn + g * (GROUP // 2) + rb[None, :], mask=n_ok[:, None],
                         other=0)
        codes = tl.interleave(packed & 15, packed >> 4)  # [BLOCK_N, GROUP], weight 2j then 2j + 1
        s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        w = ((codes.to(tl.float32) - 8) * s[:, None] + z[:, None]).to(x.dtype)
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@torch.library.triton_op("tinyserve::triton_int4_matmul", mutates_args=())  # traceable: see attention/triton_kernel.py
def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group: int) -> torch.Tensor:
    """x [M, K] @ W.T, W [N, K] given as `pack_nibbles` codes and [N, K / group] scales and zeros -> [M, N]
    in x's dtype."""
    m, k = x.shape
    n = packed.shape[0]
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64  # 16: tl.dot's smallest M; a decode step's few rows waste little
    dot_dtype, precision = dot_operands(x.dtype, x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
    wrap_triton(_int4_matmul_kernel)[grid](
        x, packed, scales, zeros, out, m, n, k,
        x.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=BLOCK_N, DOT_DTYPE=dot_dtype, PRECISION=precision,
    )
    return out


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in 0..15 -> uint8 [N, K / 2]: weight 2j in byte j's low nibble, 2j + 1 in its high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


class TritonInt4Weight(PackedWeight):
    """int4 codes in groups along K on the Triton kernel (a GPU, or CPU tensors under TRITON_INTERPRET=1)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype,
                 device: torch.device, dense: torch.Tensor | None = None) -> None:
        """q [N, K] codes in 0..15; scales, zeros [N, K / group] of `(q - 8) * s + z`; held in `dtype` on
        `device`, as the activations will be."""
        if group < 16 or group & (group - 1) or q.shape[1] % group:
            raise ValueError(f"the Triton int4 kernel takes a power-of-two group of at least 16 that divides "
                             f"the input width ({q.shape[1]}); got {group}")
        super().__init__(dense)
        self.register_buffer("packed", pack_nibbles(q).to(device))
        self.register_buffer("scales", scales.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("zeros", zeros.to(device=device, dtype=dtype).contiguous())
        self.group = group
        self.kind = f"int4-g{group} (triton)"

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_matmul(x.reshape(-1, x.shape[-1]), self.packed, self.scales, self.zeros, self.group)
        return y.view(*x.shape[:-1], y.shape[-1])
