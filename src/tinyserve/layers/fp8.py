"""FP8 (E4M3) weights: `--quantization fp8`, one scale per output channel.

E4M3 is a float (4 exponent bits, 3 mantissa bits, max 448): every weight keeps its own exponent, so a
row's scale only has to bring the row's largest weight to 448 (`absmax / 448`); precision is relative
(half a step is 2^-4 of the value) whatever the row's spread, unlike int8's uniform grid.

Two ways to multiply, chosen once when the weight is packed:
- `torch._scaled_mm` on a GPU that has FP8 tensor cores for row-wise scales (compute capability 9.0,
  Hopper): the activations are quantized per token on the fly (dynamic, absmax / 448), then one FP8 GEMM
  applies both scales to its fp32 accumulators and writes bf16. Its constraints: bf16 output with
  row-wise fp32 scales ([M, 1] and [1, N]), K and N multiples of 16, the weight operand column-major
  (`w.t()` of our row-major [N, K] is). A linear whose shapes do not fit dequantizes on read.
- dequantize on read everywhere else (CPUs, other GPUs, fp32 activations): the FP8 codes cast to the
  activations' dtype (exact: E4M3 fits in bf16), one GEMM, the per-channel scale applied to the output.
  Half the bytes of bf16 at rest; on a CPU it is a storage format, whose quality cost is what it measures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tinyserve.layers.formats import WeightSource, as_dense
from tinyserve.layers.linear import Unquantized

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALED_MM_CAPABILITY = (9, 0)  # row-wise scaled FP8 GEMMs: Hopper (torch's sm_90 kernels)


def to_fp8(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x / scales as E4M3, clamped first: an out-of-range cast is not guaranteed to saturate."""
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (E4M3 codes [N, K], fp32 scales [N]): each row's absmax maps to 448."""
    scales = (w.float().abs().amax(-1) / FP8_MAX).clamp(min=1e-12)
    return to_fp8(w, scales[:, None]), scales


def scaled_mm_fits(n: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `torch._scaled_mm` can take an [N, K] weight for activations of `dtype` on `device`."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0
            and torch.cuda.get_device_capability(device) >= SCALED_MM_CAPABILITY)


def fp8_linear(x: torch.Tensor, q: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ (q * w_scales)^T on FP8 tensor cores, x quantized per row (dynamic)."""
    x_scales = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return torch._scaled_mm(to_fp8(x, x_scales), q.t(), scale_a=x_scales, scale_b=w_scales[None, :],
                            out_dtype=x.dtype)


class Fp8Weight(nn.Module):
    """E4M3 codes [out, in] and fp32 scales [out]; `scaled_mm` says which product runs (module docstring)."""

    q: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, scaled_mm: bool) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)
        self.scaled_mm = scaled_mm
        self.kind = "fp8-e4m3" + (" (scaled_mm)" if scaled_mm else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled_mm:
            lead = x.shape[:-1]
            return fp8_linear(x.reshape(-1, x.shape[-1]), self.q, self.scales).view(*lead, -1)
        return F.linear(x, self.q.to(x.dtype)) * self.scales.to(x.dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W as the codes and scales stand for it (tests, and what the CPU path multiplies by)."""
        return (self.q.float() * self.scales[:, None]).to(dtype)

    def bytes_read(self, rows: int) -> int:
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()


class Fp8Method:
    """`--quantization fp8`: E4M3 per output channel from any checkpoint (round to nearest), every linear
    but the LM head, which stays in the model dtype as vLLM keeps it: on the bundled model the head in
    E4M3 doubled fp8's perplexity cost (docs/REPORT.md F8), and a tied head's dense table also serves the
    embedding, so the model is no larger for it."""

    name = "fp8"
    keeps_stored = False  # quantizes from dense weights (a stored quantized form is dequantized first)
    head_method = Unquantized()

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        w = torch.cat([as_dense(s).float() for s in shards])
        q, scales = quantize_fp8(w)
        n, k = w.shape
        return Fp8Weight(q.to(device), scales.to(device), scaled_mm_fits(n, k, dtype, device))
