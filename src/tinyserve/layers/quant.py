"""Weight-only quantized linears on PyTorch's packed CPU kernels, and the methods that build them.

Two kernels do the work: `aten._weight_int8pack_mm` (int8 per output channel) and
`aten._weight_int4pack_mm_for_cpu` (int4 in groups along K, computing `(q - 8) * s + z`). Both read
a quarter/eighth of the bytes a bf16 GEMV reads, so they win batch-1 decode, which is bandwidth
bound; both lose to a plain bf16 GEMM once a step carries more than a handful of tokens (docs/REPORT.md
has the measurements). So a packed weight may also keep a dense copy in the model dtype and switch
to it above `max_packed_rows` rows — set from a start-up measurement (`choose_packed_max_rows`).

GGUF blocks map onto the int4 kernel exactly, so `--quantization gguf` serves the file's weights:
  Q4_1: d * q + m        = (q - 8) * d + (m + 8 d)            -> s = d,   z = m + 8 d
  Q4_0: d * (q - 8)                                           -> s = d,   z = 0
  Q8_0: d * q, q + 128 = 16 h + l (two nibbles)
        = (h - 8) * 16 d + (l - 8) * d + 8 d                  -> two int4 halves, summed
  Q4_K: per 32 of a 256-block, (d sc) * q - dmin m
        = (q - 8) * (d sc) + (8 d sc - dmin m)                -> s = d sc, z = 8 s - dmin m
        (sc, m: that 32's 6-bit scale and min; the k-quants llama.cpp's Q4_K_M files are mostly made of)
The scales are stored in the activation dtype (the kernel requires it): exact in fp32, rounded to
bf16's 8 significant bits otherwise (docs/REPORT.md measures the cost).

A `tinyserve quantize` checkpoint (`--quantization checkpoint`) maps the same way, with no
re-quantization: its int4/int3 groups are already in the kernel's `(q - 8) * s + z` form with
bf16 scales, its int8 rows in `_weight_int8pack_mm`'s `q * s`. Groups with integer zero points
(`--zero int`, and AutoGPTQ/AutoAWQ checkpoints) are `(q - zq) * s = (q - 8) * s + (8 - zq) * s`:
z = (8 - zq) * s, exact in fp32, rounded to the activation dtype otherwise. NF4 has no kernel in
PyTorch: its codes run packed on our own (layers/nf4.py), the same bytes per weight as int4's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinyserve.layers.linear import DenseWeight, GGUFTensor, Linear, Unquantized, WeightSource, as_dense

log = logging.getLogger(__name__)

GGUF_INT4_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K")  # block types kept packed; the rest are dequantized

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
        return _dequant(self.q, s, self.kernel_zeros(), self.group)

    def kernel_zeros(self) -> torch.Tensor:
        """The int4 kernel's z of `(q - 8) * s + z` (fp32): the stored zeros, or (8 - zq) * s."""
        assert self.zeros is not None and self.format in ("int", "intz")
        if self.format == "intz":
            return (8 - self.zeros.float()) * self.scales.float()
        return self.zeros.float()


class PackedWeight(nn.Module):
    """A packed weight plus an optional dense copy for steps with many rows."""

    dense: torch.Tensor | None  # buffers: declared for the type checker (nn.Module.__getattr__ is untyped)

    def __init__(self, dense: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("dense", dense)
        self.max_packed_rows = 1 << 30  # packed kernel for every batch until a measurement says otherwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > self.max_packed_rows:
            return F.linear(x, self.dense)
        return self.packed_mm(x)

    @property
    def dense_weight(self) -> torch.Tensor | None:
        return self.dense

    def bytes_read(self, rows: int) -> int:
        """Weight bytes one product with `rows` rows streams: the dense copy's or the packed ones'."""
        if self.dense is not None and rows > self.max_packed_rows:
            return self.dense.numel() * self.dense.element_size()
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "dense")

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


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


# -- packing ----------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] in 0..15, scales/zeros [N, K/group] -> the kernel's (packed, scales_and_zeros)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()  # [K/group, N, 2]
    return packed.to(device), sz.to(device)


def quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per group: each group's [min, max] spans q = 0..15. Scales and
    zeros are rounded to `dtype` first and q is chosen against the rounded values."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 group size {group} does not divide the input width {k}; try 32")
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8).to(dtype).float()
    zeros = (lo + 8 * scales).to(dtype).float()
    q = ((wg - zeros[..., None]) / scales[..., None] + 8).round().clamp(0, 15)
    return q.view(n, k), scales, zeros


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel; the scale is rounded to `dtype` before q is chosen."""
    scales = (w.float().abs().amax(-1) / 127).clamp(min=1e-8).to(dtype).float()
    q = (w.float() / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q, scales


def gguf_int4(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 / Q8_0 / Q4_K tensor's exact int4 form: q [N', K], scales and zeros [N', K/32]
    (fp32); N' = 2N for Q8_0 (high nibbles' rows, then low nibbles')."""
    n, k = t.shape
    if t.qtype == "Q4_K":
        return _q4_k_int4(t)
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[t.qtype]
    b = t.data.view(n, k // 32, block_bytes)
    d = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)  # [N, K/32]
    if t.qtype == "Q8_0":
        u = (b[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).view(n, k)
        q = torch.cat([u >> 4, u & 15])
        return q, torch.cat([16 * d, d]), torch.cat([torch.zeros_like(d), 8 * d])
    nibbles = b[..., 4:] if t.qtype == "Q4_1" else b[..., 2:]  # 16 bytes: elements j and j + 16
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).view(n, k)
    zeros = b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) + 8 * d if t.qtype == "Q4_1" else 0 * d
    return q, d, zeros


def _q4_k_int4(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_K block: d, dmin (fp16), 12 bytes of eight 6-bit scales and mins, then 128 bytes of
    nibbles: byte j of each 32-byte chunk c holds element 64c + j (low) and 64c + 32 + j (high)."""
    n, k = t.shape
    b = t.data.view(n, k // 256, 144)
    d, dmin = (b[..., i : i + 2].contiguous().view(torch.float16).float() for i in (0, 2))  # [N, K/256, 1]
    lo6, hi6, rest = b[..., 4:16].unflatten(-1, (3, 4)).unbind(-2)  # llama.cpp's get_scale_min_k4
    sc = torch.cat([lo6 & 63, (rest & 15) | ((lo6 >> 2) & 48)], dim=-1)
    mins = torch.cat([hi6 & 63, (rest >> 4) | ((hi6 >> 2) & 48)], dim=-1)
    scales = (d * sc.float()).view(n, k // 32)  # both products exact in fp32 (11 x 6 bits)
    nibbles = b[..., 16:].unflatten(-1, (4, 1, 32))
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-2).view(n, k)
    return q, scales, 8 * scales - (dmin * mins.float()).view(n, k // 32)


# -- methods ------------------------------------------------------------------------------------------
class Int8Method:
    """`--quantization int8`: per-channel weight-only int8 from any checkpoint."""

    name = "int8"

    def __init__(self, keep_dense: bool = True) -> None:
        self.keep_dense = keep_dense

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        w = torch.cat([as_dense(s).float() for s in shards])
        q, scales = quantize_int8(w, dtype)
        dense = (q.float() * scales[:, None]).to(device=device, dtype=dtype) if self.keep_dense else None
        return Int8Weight(q.to(device), scales.to(device=device, dtype=dtype), dense)


class Int4Method:
    """`--quantization int4`: group-wise asymmetric int4 (RTN) from any checkpoint."""

    name = "int4"

    def __init__(self, group: int, keep_dense: bool = True) -> None:
        self.group = group
        self.keep_dense = keep_dense

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        w = torch.cat([as_dense(s).float() for s in shards])
        q, scales, zeros = quantize_int4(w, self.group, dtype)
        packed, sz = pack_int4(q, scales, zeros, self.group, dtype, device)
        dense = _dequant(q, scales, zeros, self.group).to(device=device, dtype=dtype) if self.keep_dense else None
        return Int4Weight(packed, sz, self.group, False, dense)


class GGUFMethod:
    """`--quantization gguf`: a GGUF's Q4_0 / Q4_1 / Q8_0 / Q4_K blocks stay packed (the file's own weights);
    other block types, and linears whose shards mix Q8_0 with 4-bit types, are dequantized."""

    name = "gguf"

    def __init__(self, keep_dense: bool = True) -> None:
        self.keep_dense = keep_dense

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        types = {s.qtype if isinstance(s, GGUFTensor) else "dense" for s in shards}
        if not (types <= set(GGUF_INT4_TYPES)) or ("Q8_0" in types and len(types) > 1):
            return Unquantized().pack(shards, dtype, device)
        halves = types == {"Q8_0"}
        parts: list[tuple[torch.Tensor, ...]] = [gguf_int4(s) for s in shards if isinstance(s, GGUFTensor)]
        if halves:  # [hi_1; hi_2; ...; lo_1; lo_2; ...] so one chunk(2) splits every shard's halves
            parts = [tuple(torch.cat([p[i].chunk(2)[h] for p in parts]) for i in range(3)) for h in (0, 1)]
        q, scales, zeros = (torch.cat([p[i] for p in parts]) for i in range(3))
        packed, sz = pack_int4(q, scales, zeros, 32, dtype, device)
        dense = None
        if self.keep_dense:  # the int4 form dequantizes to the file's values exactly (tests/test_quant.py)
            w = _dequant(q, scales, zeros, 32)
            if halves:
                hi, lo = w.chunk(2)
                w = hi + lo
            dense = w.to(device=device, dtype=dtype)
        return Int4Weight(packed, sz, 32, halves, dense)


class CheckpointMethod:
    """`--quantization checkpoint`: a `tinyserve quantize` directory's weights as stored, no
    re-quantization: "int"/"intz" groups on the int4 kernel, "int8" rows on the int8 kernel, "nf4" on our
    NF4 kernel (layers/nf4.py; dense where it cannot be built). Shards that are not all in one such form
    are dequantized."""

    name = "checkpoint"

    def __init__(self, keep_dense: bool = True) -> None:
        self.keep_dense = keep_dense

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        forms = {(s.format, s.bits, s.group) if isinstance(s, QuantizedTensor) else None for s in shards}
        form = forms.pop() if len(forms) == 1 else None
        if form is None:
            return Unquantized().pack(shards, dtype, device)
        qs = [s for s in shards if isinstance(s, QuantizedTensor)]
        if form[0] == "nf4":
            from tinyserve.layers.nf4 import nf4_weight  # it builds on PackedWeight, defined here

            return nf4_weight(qs, dtype, device, self.keep_dense) or Unquantized().pack(shards, dtype, device)
        q, scales = torch.cat([s.q for s in qs]), torch.cat([s.scales for s in qs]).float()
        dense = torch.cat([s.dequantize() for s in qs]).to(device=device, dtype=dtype) if self.keep_dense else None
        if form[0] == "int8":
            return Int8Weight(q.to(device), scales.to(device=device, dtype=dtype), dense)
        zeros = torch.cat([s.kernel_zeros() for s in qs])
        packed, sz = pack_int4(q, scales, zeros, form[2], dtype, device)
        weight = Int4Weight(packed, sz, form[2], False, dense)
        weight.kind = f"int{form[1]}-g{form[2]}" + (" (int4 kernel)" if form[1] != 4 else "")
        return weight


def _dequant(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    w = (q.float().view(n, k // group, group) - 8) * scales[..., None] + zeros[..., None]
    return w.view(n, k)


def make_method(name: str, group: int) -> Unquantized | Int8Method | Int4Method | GGUFMethod | CheckpointMethod:
    """The method registered under `--quantization name` (auto is resolved by the loader first)."""
    if name == "checkpoint":
        return CheckpointMethod()
    if name == "none":
        return Unquantized()
    if name == "int8":
        return Int8Method()
    if name == "int4":
        return Int4Method(group)
    if name == "gguf":
        return GGUFMethod()
    raise ValueError(f"unknown quantization method {name!r}")


# -- kernel choice per batch size -------------------------------------------------------------------------
def packed_weights(model: nn.Module) -> list[tuple[Linear, PackedWeight]]:
    return [(m, m.impl) for m in model.modules() if isinstance(m, Linear) and isinstance(m.impl, PackedWeight)]


def configure_packed_kernels(model: nn.Module, rows: int | None, max_step_rows: int, dtype: torch.dtype,
                             cache: tuple[Path, str] | None = None) -> int:
    """Packed kernels for steps of up to `rows` rows, the dense copies above; what no step can reach
    is freed (the dense copies, or with `rows=0` the packed weights). `rows=None` measures the
    crossover on this machine, once: with `cache` = (json file, key naming model, mode and machine)
    later starts read the answer instead. An implausible answer (`plausible_crossover`) is neither
    trusted from the cache nor written to it: it was measured on a busy machine. Returns the threshold."""
    weights = packed_weights(model)
    if not weights:
        return 0
    if rows is None:
        store = _CrossoverCache(cache[0]) if cache else None
        # the kernels in use are part of the key: a model whose layers gain a packed kernel measures afresh
        key = f"{cache[1]}|{'+'.join(sorted({str(getattr(w, 'kind', '?')) for _, w in weights}))}" if cache else ""
        rows = store.get(key) if store else None
        if rows is not None and not plausible_crossover(rows, dtype):
            log.info("cached kernel choice (%d rows) is implausible in %s: measuring again", rows, dtype)
            rows = None
        if rows is None:
            rows, timings = choose_packed_max_rows(model, dtype)
            log.info("packed kernels up to %d rows per step (ms packed/dense by rows: %s)", rows,
                     ", ".join(f"{m}: {p:.1f}/{d:.1f}" for m, (p, d) in timings.items()))
            if not plausible_crossover(rows, dtype):
                log.warning("the packed kernels lost to dense even at one row in %s (a busy machine?): "
                            "dense for this start, not cached", dtype)
            elif store:
                store.put(key, rows)
    for lin, w in weights:
        w.max_packed_rows = rows
        if rows >= max_step_rows:
            w.dense = None
        elif rows == 0 and w.dense is not None:  # never packed: keep only the dense copy
            lin.impl = DenseWeight(w.dense)
    return rows


def plausible_crossover(rows: int, dtype: torch.dtype) -> bool:
    """With 16-bit activations a packed weight streams 2-4x fewer bytes than its dense copy, so a
    one-row product (decode: bandwidth bound) must favor it; a measurement that says "dense from one
    row" (0) was disturbed. In fp32 the packed kernels also convert activations and may lose: any answer."""
    return rows > 0 or dtype == torch.float32


class _CrossoverCache:
    """Measured crossovers in a small JSON file: {key: rows}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, int]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> int | None:
        return self._read().get(key)

    def put(self, key: str, rows: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**self._read(), key: rows}, indent=1, sort_keys=True))
            tmp.replace(self.path)  # atomic: concurrent starts never read half a file
        except OSError as e:  # a read-only home is no reason not to serve
            log.warning("could not cache the kernel choice in %s: %s", self.path, e)


def _time_kernels(with_dense: Sequence[tuple[Linear, PackedWeight, torch.Tensor]], xs: dict[int, torch.Tensor],
                  reps: int) -> tuple[float, float]:
    """Best-of-`reps` ms for every packed linear one way, then the other, the two interleaved rep by rep so
    that a burst of load from elsewhere hits both alike rather than one whole side."""
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for side in (0, 1):
            start = time.perf_counter()
            for lin, w, dense in with_dense:
                w.packed_mm(xs[lin.in_features]) if side == 0 else F.linear(xs[lin.in_features], dense)
            best[side] = min(best[side], time.perf_counter() - start)
    return best[0] * 1e3, best[1] * 1e3


@torch.inference_mode()
def choose_packed_max_rows(model: nn.Module, dtype: torch.dtype, candidates: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                           reps: int = 5) -> tuple[int, dict[int, tuple[float, float]]]:
    """Time every packed linear of the model both ways at growing row counts until the dense copy
    wins; the last count at which packed was faster (0 if it never is). Also returns the timings (ms).
    Stopping at the first loss bounds the start-up cost (a slow packed kernel loses at once); a loss
    is measured a second time (best of both) before it stands, so one disturbed sample cannot end it."""
    weights = packed_weights(model)
    with_dense = [(lin, w, w.dense) for lin, w in weights if w.dense is not None]
    if not weights or len(with_dense) < len(weights):
        return (1 << 30 if weights else 0), {}
    timings: dict[int, tuple[float, float]] = {}
    best = 0
    for m in candidates:
        xs = {lin.in_features: torch.randn(m, lin.in_features, dtype=dtype, device=dense.device)
              for lin, _, dense in with_dense}
        _time_kernels(with_dense, xs, 1)  # warm-up
        packed, dense = _time_kernels(with_dense, xs, reps)
        if packed > dense:  # confirm: the best of twice the samples
            again = _time_kernels(with_dense, xs, reps)
            packed, dense = min(packed, again[0]), min(dense, again[1])
        timings[m] = (packed, dense)
        if packed > dense:
            break
        best = m
    return best, timings
