"""The quantization grids every method shares, and round-to-nearest (RTN) on them.

A `Spec` names a grid: "int" (asymmetric groups of `group` along K, 3 or 4 bits, in the int4 kernel's
form w = (q - 8) * s + z with a real-valued zero z: GGUF Q4_1's min/max grid), "intz" (the same groups
with an integer zero point, w = (q - zq) * s: the grid AutoGPTQ/AutoAWQ checkpoints store, so that
`--format gptq|awq` exports are exact; with `sym` every zq is 2^(bits-1) and s = 2 absmax / maxq,
GPTQ's `sym: true`, the variant vLLM's GPTQ path and Marlin take), "int8" (symmetric per output row, the int8 kernel's
w = q * s) or "nf4" (QLoRA's 16-value codebook times each group's absmax). GPTQ and AWQ choose
*which* codes to store; the grid, and how a weight column is rounded onto it, is defined once here.

Scales and zeros are rounded to bf16 before any code is chosen: the checkpoint stores them in bf16
(the kernels want them in the activation dtype), so the codes are optimal for the values actually served.
"intz" scales are also kept >= 2^-14 (fp16's smallest normal): a bf16 value in fp16's normal range is
exact in fp16, the scale dtype of the field's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyserve.layers.formats import NF4_CODEBOOK, QuantizedTensor

SCALE_DTYPE = torch.bfloat16
FP16_MIN_NORMAL = 2.0**-14
GROUPED = ("int", "intz")  # the grids in groups along K, on the int4 kernel


@dataclass(frozen=True)
class Spec:
    """A quantization grid: format, bits, group size (int8 ignores the group: one scale per row)."""

    format: str  # "int" | "intz" | "int8" | "nf4"
    bits: int
    group: int
    sym: bool = False  # "intz" only: zero points fixed at the middle code

    @classmethod
    def make(cls, method: str, bits: int, group: int, zero: str = "float") -> Spec:
        """The grid a method/bits/group/zero-point choice means, or a clear error."""
        if zero not in ("float", "int", "sym"):
            raise ValueError(f"--zero must be float, int or sym; got {zero!r}")
        if method == "nf4":
            if bits != 4:
                raise ValueError(f"nf4 is a 4-bit format; got --bits {bits}")
            if zero != "float":
                raise ValueError(f"--zero {zero} applies to the 3/4-bit int grids; nf4 has no zero point")
            return cls("nf4", 4, group)
        if bits == 8:  # per output channel: the int8 kernel has no groups; symmetric, so its zero is 0 anyway
            return cls("int8", 8, 0)
        if bits not in (3, 4):
            raise ValueError(f"--bits must be 3, 4 or 8; got {bits}")
        return cls("int", bits, group) if zero == "float" else cls("intz", bits, group, zero == "sym")

    @property
    def grouped(self) -> bool:
        return self.format in GROUPED

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def check(self, name: str, k: int) -> None:
        """Every weight's input width must split into whole groups (the kernel's layout)."""
        if self.format != "int8" and (self.group < 1 or k % self.group):
            raise ValueError(f"group size {self.group} does not divide the input width {k} of {name}; "
                             f"groups that do: {[g for g in (32, 64, 128, 256) if k % g == 0]}")


def fit(w: torch.Tensor, spec: Spec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grid's parameters for `w` [N, G*group] (int8: [N, K]): min/max for "int" (scales, zeros
    [N, G]) and "intz" (scales, integer zero points), absmax for "nf4" and "int8" (scales; zeros None);
    bf16-rounded, returned in fp32."""
    w = w.float()
    if spec.format == "int8":
        return (w.abs().amax(-1) / 127).clamp(min=1e-8).to(SCALE_DTYPE).float(), None
    wg = w.view(w.shape[0], -1, spec.group)
    if spec.format == "nf4":
        return wg.abs().amax(-1).clamp(min=1e-8).to(SCALE_DTYPE).float(), None
    if spec.format == "intz":
        return fit_int_zero(wg, spec.maxq, spec.sym)
    lo, hi = wg.amin(-1), wg.amax(-1)  # each group's own range, as GGUF's Q4_1 (the bundled file's layers)
    scales = ((hi - lo) / spec.maxq).clamp(min=1e-8).to(SCALE_DTYPE).float()
    zeros = (lo + 8 * scales).to(SCALE_DTYPE).float()
    return scales, zeros


def fit_int_zero(wg: torch.Tensor, maxq: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's quantizer on groups wg [N, G, group]. Asymmetric: the range is widened to include 0 (so
    0 is exact), s = range / maxq, zq = round(-min / s). zq is kept >= 1: GPTQ's (v1) checkpoint format
    stores zq - 1 in `bits` bits, so zq = 0 cannot be written (AutoGPTQ's packer corrupts it); a group
    with no negative weight takes zq = 1 and s = max / (maxq - 1) instead. Symmetric: s = 2 absmax / maxq,
    zq = (maxq + 1) / 2 (the top code falls short of +absmax by half a step, as in GPTQ)."""
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    if sym:
        scales = (2 * torch.maximum(-lo, hi) / maxq).clamp(min=FP16_MIN_NORMAL).to(SCALE_DTYPE).float()
        return scales, torch.full_like(scales, (maxq + 1) // 2)
    scales = ((hi - lo) / maxq).clamp(min=FP16_MIN_NORMAL)
    nonneg = (-lo / scales).round() < 1
    scales = torch.where(nonneg, (hi / (maxq - 1)).clamp(min=FP16_MIN_NORMAL), scales).to(SCALE_DTYPE).float()
    zeros = (-lo / scales).round().clamp(1, maxq)
    return scales, zeros


def codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: Spec) -> torch.Tensor:
    """Round `w` [N, C] onto the grid whose per-column parameters are `scales`/`zeros` [N, C]
    (already expanded to columns): the nearest code of each weight."""
    if spec.format == "int8":
        return (w / scales).round().clamp(-128, 127)
    if spec.format == "nf4":  # the codebook is sorted: nearest code = which midpoint interval (no [N, C, 16] temp)
        book = NF4_CODEBOOK.to(w.device)
        return torch.bucketize(w / scales, (book[1:] + book[:-1]) / 2).float()
    assert zeros is not None
    if spec.format == "intz":
        return ((w / scales).round() + zeros).clamp(0, spec.maxq)
    return ((w - zeros) / scales + 8).round().clamp(0, spec.maxq)


def decode(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: Spec) -> torch.Tensor:
    """The value of codes `q` [N, C] under per-column `scales`/`zeros` [N, C]."""
    if spec.format == "int8":
        return q * scales
    if spec.format == "nf4":
        return NF4_CODEBOOK.to(q.device)[q.long()] * scales
    assert zeros is not None
    if spec.format == "intz":
        return (q - zeros) * scales
    return (q - 8) * scales + zeros


def per_column(t: torch.Tensor | None, spec: Spec, k: int) -> torch.Tensor | None:
    """Group parameters [N, G] (int8: [N]) expanded to one per weight [N, K]."""
    if t is None:
        return None
    if spec.format == "int8":
        return t[:, None].expand(-1, k)
    return t.repeat_interleave(spec.group, dim=1)


def fake_quantize(w: torch.Tensor, spec: Spec) -> torch.Tensor:
    """RTN's weights as served (fp32): what AWQ's searches score."""
    scales, zeros = fit(w, spec)
    s, z = per_column(scales, spec, w.shape[1]), per_column(zeros, spec, w.shape[1])
    assert s is not None
    return decode(codes(w.float(), s, z, spec), s, z, spec)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: Spec) -> QuantizedTensor:
    dtype = torch.int8 if spec.format == "int8" else torch.uint8
    zero_dtype = torch.uint8 if spec.format == "intz" else SCALE_DTYPE  # integer zero points stay integers
    return QuantizedTensor(spec.format, spec.bits, spec.group or q.shape[1], q.to(dtype), scales.to(SCALE_DTYPE),
                           None if zeros is None else zeros.to(zero_dtype))


def rtn(w: torch.Tensor, spec: Spec) -> QuantizedTensor:
    """Round-to-nearest: every weight to its nearest code; the baseline the calibrated methods must beat."""
    scales, zeros = fit(w, spec)
    k = w.shape[1]
    s, z = per_column(scales, spec, k), per_column(zeros, spec, k)
    assert s is not None
    return pack(codes(w.float(), s, z, spec), scales, zeros, spec)
