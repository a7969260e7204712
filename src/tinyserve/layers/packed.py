"""Weight-only quantized weights on packed kernels, each with an optional dense copy for big steps.

Two PyTorch CPU kernels do the work: `aten._weight_int8pack_mm` (int8 per output channel) and
`aten._weight_int4pack_mm_for_cpu` (int4 in groups along K, computing `(q - 8) * s + z`); NF4 runs on
our own (layers/nf4.py). They read a quarter to an eighth of the bytes a 16-bit GEMV reads, so they win
decode steps of a few rows, which are bandwidth bound, and lose to a dense GEMM once a step carries
more rows. So a packed weight may keep a dense copy in the model dtype and switch to it above
`packed_max_rows` rows, set from a start-up measurement (layers/kernel_choice.py).
"""

from __future__ import annotations

import torch
from torch import nn

from tinyserve.layers import bf16_gemm, int8_gemm


class PackedWeight(nn.Module):
    """A packed weight plus optional copies for steps with many rows: dense in the model dtype, and (int8
    compute) int8 per output channel, multiplied by the step's activations quantized per token. Rows up
    to `packed_max_rows` run packed, above on a copy: the int8 one where `int8_active` — inside the
    compiled decode step, where the activations' quantization fuses into the ops around it, and, on a CPU
    without AMX, in eager steps too; the dense one in eager steps where AMX runs the 16-bit GEMM as fast
    as the int8 product's separate passes over memory (REPORT I8, VR)."""

    # buffers: declared for the type checker (nn.Module.__getattr__ is untyped)
    dense: torch.Tensor | None
    dense_q: torch.Tensor | None  # the int8-compute copy: int8 [out, in], or packed (layers/int8_gemm.py)
    dense_scales: torch.Tensor | None  # fp32 [out]
    dense_cols: torch.Tensor | None  # fp32 [in]: the packed copy's column factors (int8_gemm.column_factors)

    def __init__(self, dense: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("dense", dense)
        self.register_buffer("dense_q", None)
        self.register_buffer("dense_scales", None)
        self.register_buffer("dense_cols", None)
        self.packed_max_rows = 1 << 30  # packed kernel for every batch until a measurement says otherwise
        self.int8_active = False  # products above packed_max_rows on the int8 copy (worker/served_model.py)
        self.int8_chunk_rows: int | None = None  # eager int8 products in pieces of this many rows (None: whole)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_copy and x.shape[0] > self.packed_max_rows:
            return self.copy_mm(x)
        return self.packed_mm(x)

    @property
    def has_copy(self) -> bool:
        return self.dense is not None or self.dense_q is not None

    def copy_mm(self, x: torch.Tensor) -> torch.Tensor:
        """The product on the large-step copy."""
        if self._on_int8():
            assert self.dense_q is not None and self.dense_scales is not None
            if self.dense_cols is not None:  # packed for our kernel, which needs no pieces
                return int8_gemm.linear(x, self.dense_q, self.dense_scales, self.dense_cols)
            rows = self.int8_chunk_rows
            if rows is not None and x.shape[0] > rows:
                return torch.cat([int8_linear(part, self.dense_q, self.dense_scales)
                                  for part in x.split(rows)])
            return int8_linear(x, self.dense_q, self.dense_scales)
        assert self.dense is not None
        return bf16_gemm.linear(x, self.dense)

    def _on_int8(self) -> bool:
        return self.dense_q is not None and (self.int8_active or self.dense is None)

    def int8_copy(self, per_token: bool = True) -> bool:
        """Add an int8 copy beside the dense one, from it, codes per output channel: packed for our kernel
        where it runs (bf16 activations on a CPU with VNNI and no AMX; columns evened out, activations
        blocked), else for `int8_linear`'s one scale per token, if `per_token` (the kinds that tolerate
        it). Returns whether a copy was made."""
        if self.dense is None:
            return False
        w = bf16_gemm.unpack(self.dense)
        if self.dense.dtype == torch.bfloat16 and int8_gemm.fits(*w.shape) and int8_gemm.enabled(w.device):
            self.dense_cols = int8_gemm.column_factors(w)
            q, self.dense_scales = quantize_int8(w, torch.float32, self.dense_cols)
            self.dense_q = int8_gemm.pack(q)
        elif per_token:
            self.dense_q, self.dense_scales = quantize_int8(w, torch.float32)
        return self.dense_q is not None

    def drop_copy(self) -> None:
        self.dense = self.dense_q = self.dense_scales = self.dense_cols = None

    @property
    def dense_weight(self) -> torch.Tensor | None:
        return self.dense

    def bytes_read(self, rows: int) -> int:
        """Weight bytes one product with `rows` rows streams: the copy's it runs on, or the packed ones'."""
        copies = ("dense", "dense_q", "dense_scales", "dense_cols")
        if not (self.has_copy and rows > self.packed_max_rows):
            return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n not in copies)
        used = copies[1:] if self._on_int8() else copies[:1]
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n in used)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# The linears int8 compute multiplies in int8. On our kernel (activations in blocks, weight columns evened
# out: layers/int8_gemm.py) every kind of a layer: +0.56% held-out perplexity on the bundled model for the
# four (`python -m tinyserve_lab.ablations.int8_compute --per-linear --windows 32`; the LM head would add
# ~0.4% for a gain the noise hid: REPORT B8). With one scale per token (oneDNN's `_int_mm`, where AMX runs
# it) only the kinds whose inputs tolerate it: per token qkv_proj cost +1.0%, down_proj +1.8% (its
# SiLU-gated input is heavy-tailed), o_proj and gate_up_proj +0.2-0.4% each (REPORT I8, B8).
INT8_COMPUTE_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
INT8_PER_TOKEN_LINEARS = ("o_proj", "gate_up_proj")
# Eager int8 products (prefills, on CPUs without AMX) in pieces of this many rows: the quantize and rescale
# passes around the GEMM then stay in the caches. The 1.5B's gate_up (1536 -> 17920) at 1024 rows took 169
# ms whole, 119 in pieces of 128, against 142 for the bf16 GEMM (EPYC, REPORT VR).
INT8_CHUNK_ROWS = 128


def quantize_int8(w: torch.Tensor, dtype: torch.dtype,
                  cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel (of w / cols, where given: fp32 [in]); the scale is rounded to `dtype`
    before q is chosen. A 1 MB piece of rows at a time, so the fp32 temporaries stay in cache (the same
    bits: each row is quantized alone either way): as passes over whole matrices, the 1.5B's int8 copies
    took 8.5 s of its load."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(n, dtype=torch.float32, device=w.device)
    step = int8_gemm.piece_rows(k)
    for r in range(0, n, step):
        part = w[r : r + step].float()  # a view where w is fp32: not written to
        if cols is not None:
            part = part / cols
        s = (part.abs().amax(-1) / 127).clamp(min=1e-8).to(dtype).float()
        scales[r : r + step] = s
        q[r : r + step] = (part / s[:, None]).round_().clamp_(-128, 127)
    return q, scales


def int8_in_graph(model: nn.Module) -> None:
    """Make `model`'s int8 copies serve its large products (the compiled step's traced copy of the model)."""
    for m in model.modules():
        if isinstance(m, PackedWeight) and m.dense_q is not None:
            m.int8_active = True
            m.int8_chunk_rows = None  # one traced product; inductor fuses its passes


def int8_linear(x: torch.Tensor, q: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """x @ (q * w_scales).T with x quantized to int8 per row (dynamic, symmetric): an int8 x int8 -> int32
    GEMM on oneDNN's kernel (VNNI, AMX where present), then both scales; `q.t()` is the column-major [in,
    out] operand it multiplies fastest (1.3-1.8x the row-major one, docs/REPORT.md). Copies packed for our
    VNNI kernel take `int8_gemm.linear` instead (blocked activations: another arithmetic)."""
    xf = x.float()
    x_scales = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    xq = (xf / x_scales).round().to(torch.int8)  # |x / scale| <= 127 by construction
    return (torch._int_mm(xq, q.t()).float() * x_scales * w_scales).to(x.dtype)


class Int8Weight(PackedWeight):
    """int8 [out, in] with one scale per output channel."""

    kind = "int8"
    q: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dense: torch.Tensor | None) -> None:
        super().__init__(dense)
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.q, self.scales)


class Int4Weight(PackedWeight):
    """int4 packed for the CPU kernel, scales and zeros per `group` weights along K. With `halves`
    the packed rows hold two matrices stacked along N whose products are summed (Q8_0's nibbles)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, halves: bool,
                 dense: torch.Tensor | None) -> None:
        super().__init__(dense)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.group = group
        self.halves = halves
        self.kind = f"int4-g{group}" + ("x2" if halves else "")

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)
        if self.halves:
            hi, lo = y.chunk(2, dim=-1)
            return hi + lo
        return y



def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] in 0..15, scales/zeros [N, K/group] -> the kernel's (packed, scales_and_zeros)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()  # [K/group, N, 2]
    return packed.to(device), sz.to(device)
