"""What `tl.dot` multiplies in, for the Triton kernels (attention/triton_kernel.py, layers/triton_int4.py).

On a GPU: the data's own dtype, and fp32 without TF32 (an fp32 model stays as exact as its reference
path). On CPU tensors, i.e. under TRITON_INTERPRET=1 (the tests): bf16 operands are widened to fp32
first, because Triton 3.9's interpreter keeps bf16 as raw uint16 and multiplies the bits. A bf16
product is exact in fp32, so the widened dot differs from the GPU's only in summation order.
"""

from __future__ import annotations

import torch
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_operands(dtype: torch.dtype, device: torch.device) -> tuple[tl.dtype, str | None]:
    """(the dtype dot operands are cast to, tl.dot's input_precision) for data of `dtype` on `device`."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu"):
        return tl.float32, "ieee"
    return _TL_DTYPES[dtype], None  # the target's default: input_precision only matters for fp32 operands
