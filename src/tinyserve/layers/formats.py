"""The forms a weight arrives in from a file, before a quantization method packs it (layers/methods.py).

A dense tensor; a GGUF file's raw blocks (`GGUFTensor`); a quantized checkpoint's codes, scales and
zeros (`QuantizedTensor`: `tinyserve quantize` directories, AutoGPTQ/AutoAWQ ones, read by
models/quantized.py). A method that understands a stored form keeps it; any other dequantizes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class GGUFTensor:
    """A weight as it sits in a GGUF file: raw blocks [rows, row_bytes] of `qtype` (rows already in
    HF order)."""

    qtype: str  # GGMLQuantizationType name: "Q4_1", "Q8_0", ...
    data: torch.Tensor  # uint8 [rows, row_bytes]
    shape: tuple[int, int]  # (rows, cols) of the dequantized matrix

    def dequantize(self) -> torch.Tensor:
        """fp32, exactly as the `gguf` package computes it: in torch for the common types (10x faster
        than its numpy, which is a start-up cost for a 1B model), by `gguf` for the rest."""
        rows, cols = self.shape
        exact = _DEQUANT.get(self.qtype)
        if exact is not None:
            return exact(self.data, rows, cols).view(self.shape)
        import gguf

        w = gguf.quants.dequantize(self.data.numpy(), gguf.GGMLQuantizationType[self.qtype])
        return torch.from_numpy(w.copy()).view(self.shape)


def fp16_field(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of every GGUF block (last dim: the block's bytes), as fp32 [..., 1]."""
    return b[..., at : at + 2].contiguous().view(torch.float16).float()


def nibbles(b: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """16 bytes per 32 weights: weight j in the low nibble of byte j, weight j + 16 in its high one."""
    return torch.cat([b & 15, b >> 4], dim=-1).view(n, k)


def k_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A K-quant super-block's 12 bytes of eight 6-bit scales and mins (llama.cpp's get_scale_min_k4):
    uint8 [..., 8] each."""
    lo6, hi6, rest = b.unflatten(-1, (3, 4)).unbind(-2)
    sc = torch.cat([lo6 & 63, (rest & 15) | ((lo6 >> 2) & 48)], dim=-1)
    mins = torch.cat([hi6 & 63, (rest >> 4) | ((hi6 >> 2) & 48)], dim=-1)
    return sc, mins


def _shifted(b: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    """b [..., 1, W] >> each shift: [..., len(shifts), W]."""
    return b >> torch.tensor(shifts, dtype=torch.uint8).view(len(shifts), 1)


def _q4_k(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    b = data.reshape(-1, 144)
    nb = b.shape[0]
    sc, mins = k_scale_min(b[:, 4:16])
    d = (fp16_field(b, 0) * sc.float()).view(nb, 8, 1)
    dm = (fp16_field(b, 2) * mins.float()).view(nb, 8, 1)
    q = (_shifted(b[:, 16:].reshape(nb, 4, 1, 32), (0, 4)) & 15).reshape(nb, 8, 32).float()
    return (d * q - dm).reshape(n, k)


def _q6_k(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    b = data.reshape(-1, 210)
    nb = b.shape[0]
    ql = (_shifted(b[:, :128].reshape(nb, 2, 1, 64), (0, 4)) & 15).reshape(nb, 8, 32)
    qh = (_shifted(b[:, 128:192].reshape(nb, 2, 1, 32), (0, 2, 4, 6)) & 3).reshape(nb, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(nb, 16, 16).float()
    d = (fp16_field(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).view(nb, 16, 1)
    return (d * q).reshape(n, k)


# The same operations, in the same order, as gguf.quants (so the same fp32 values, bit for bit:
# tests/test_gguf_load.py). Products are computed per block: d [N, blocks, 1] * q [N, blocks, weights].
_DEQUANT = {
    "Q4_K": _q4_k,
    "Q6_K": _q6_k,
    "Q4_0": lambda data, n, k: fp16_field(b := data.view(n, k // 32, 18), 0)
    * (nibbles(b[..., 2:], n, k).to(torch.int8) - 8).view(n, k // 32, 32).float(),
    "Q4_1": lambda data, n, k: fp16_field(b := data.view(n, k // 32, 20), 0)
    * nibbles(b[..., 4:], n, k).view(n, k // 32, 32).float() + fp16_field(b, 2),
    "Q8_0": lambda data, n, k: (b := data.view(n, k // 32, 34))[..., 2:].contiguous().view(torch.int8).float()
    * fp16_field(b, 0),
}


class StoredWeight(Protocol):
    """A weight kept in a file's own quantized form (GGUF blocks, a quantized checkpoint)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def dequantize(self) -> torch.Tensor: ...


WeightSource = torch.Tensor | StoredWeight


def as_dense(src: WeightSource) -> torch.Tensor:
    """The fp32 (or checkpoint-dtype) matrix of any weight source."""
    return src if isinstance(src, torch.Tensor) else src.dequantize()


# QLoRA's NormalFloat4: the 16 quantiles of N(0, 1) scaled to [-1, 1], with an exact zero
# (Dettmers et al. 2023, appendix E; bitsandbytes' table).
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
QUANT_FORMATS = ("int", "intz", "int8", "nf4")


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight of a quantized checkpoint, its codes unpacked (one per element):

    - "int" (bits 3 or 4): asymmetric groups of `group` along K, w = (q - 8) * s + z, q in 0..2^bits-1
      (the int4 kernel's form; 3-bit codes simply never exceed 7);
    - "intz" (bits 3 or 4): the same groups with integer zero points zq (uint8), w = (q - zq) * s
      (AutoGPTQ's and AutoAWQ's grid);
    - "int8": symmetric per output row, w = q * s, q in -128..127 (group = K);
    - "nf4": w = NF4_CODEBOOK[q] * s per group (s = the group's absmax); zeros is None.
    """

    format: str
    bits: int
    group: int
    q: torch.Tensor  # uint8 ("int", "nf4") or int8 [N, K]
    scales: torch.Tensor  # [N, K / group]; int8: [N]
    zeros: torch.Tensor | None  # [N, K / group] for "int" (real) and "intz" (integer)

    def __post_init__(self) -> None:
        if self.format not in QUANT_FORMATS:
            raise ValueError(f"unknown quantized format {self.format!r} (known: {', '.join(QUANT_FORMATS)})")
        n, k = self.q.shape
        groups = (n,) if self.format == "int8" else (n, k // self.group)
        if k % self.group or tuple(self.scales.shape) != groups:
            raise ValueError(f"{self.format} tensor {tuple(self.q.shape)}: scales {tuple(self.scales.shape)} do not "
                             f"match groups of {self.group}")

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.q.shape
        return n, k

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        s = self.scales.float()
        if self.format == "int8":
            return self.q.float() * s[:, None]
        if self.format == "nf4":
            w = NF4_CODEBOOK[self.q.long()].view(n, -1, self.group) * s[..., None]
            return w.view(n, k)
        return dequant_groups(self.q, s, self.kernel_zeros(), self.group)

    def kernel_zeros(self) -> torch.Tensor:
        """The int4 kernel's z of `(q - 8) * s + z` (fp32): the stored zeros, or (8 - zq) * s."""
        assert self.zeros is not None and self.format in ("int", "intz")
        if self.format == "intz":
            return (8 - self.zeros.float()) * self.scales.float()
        return self.zeros.float()


def dequant_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """Codes in the int4 kernel's form, `(q - 8) * s + z` per group of `group` along K, as one matrix."""
    n, k = q.shape
    w = (q.float().view(n, k // group, group) - 8) * scales[..., None] + zeros[..., None]
    return w.view(n, k)


def dense_copy(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype,
               device: torch.device, halves: bool = False, chunk: int = 256) -> torch.Tensor:
    """`dequant_groups` (with `halves`, the two halves' matrices summed) in `dtype` on `device`, `chunk`
    rows at a time: the same values, without a whole fp32 matrix (5 GB for a 1.5B model) going
    through memory three times (a start-up cost: seconds)."""
    n, k = q.shape
    rows = n // 2 if halves else n
    out = torch.empty(rows, k, dtype=dtype, device=device)
    for r in range(0, rows, chunk):
        e = min(r + chunk, rows)
        w = dequant_groups(q[r:e], scales[r:e], zeros[r:e], group)
        if halves:
            w = w + dequant_groups(q[rows + r : rows + e], scales[rows + r : rows + e], zeros[rows + r : rows + e],
                                   group)
        out[r:e] = w
    return out

