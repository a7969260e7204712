"""RMSNorm and SwiGLU's SiLU(gate) * up for eager steps, each one pass of a native kernel (csrc/eager_ops.cpp).

Prefill chunks and mixed steps run eager, and there ATen's RMSNorm is a chain of ops over full-size
fp32 temporaries and SwiGLU two ops with a bf16 rounding between them: together about a quarter of a
wave's prefill on the bundled model (docs/REPORT.md, section PA). The compiled decode step fuses these
ops itself, so a traced graph keeps the ATen ops (inductor fuses them with their neighbours; an opaque
op would stop it). Used for bf16 activations on a CPU once `enable()` has loaded the kernel; fp32 keeps
ATen's ops and their exactness against the reference. A process decides once, when its model loads,
so a request's arithmetic does not change while it is served.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tinyserve import native

SOURCE = Path(__file__).parent / "csrc" / "eager_ops.cpp"
OPS = native.NativeOps(SOURCE, {}, "eager steps keep ATen's RMSNorm and SiLU ops")
_enabled = False


def wanted(dtype: torch.dtype, device: str) -> bool:
    return device == "cpu" and dtype == torch.bfloat16


def prefetch(dtype: torch.dtype, device: str) -> None:
    """Start building the kernel on a thread where `enable` will want it, to overlap loading the model."""
    if wanted(dtype, device):
        native.build_in_background(SOURCE)


def enable(dtype: torch.dtype, device: str) -> bool:
    """Serve eager bf16 steps on CPU with the kernels (waits for their build); False where they cannot be built."""
    global _enabled
    if wanted(dtype, device) and OPS.available():
        _enabled = True
    return _enabled


def _native(x: torch.Tensor) -> bool:
    return (_enabled and x.dtype == torch.bfloat16 and x.is_cpu and x.dim() == 2 and x.is_contiguous()
            and not torch.compiler.is_compiling())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _native(x):
        return torch.ops.tinyserve.rms_norm(x, weight, eps)
    # One fused op (it accumulates in fp32): bit-identical to the reference's normalize-then-scale in fp32.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half of the last dim times the second half."""
    if _native(gate_up):
        return torch.ops.tinyserve.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
