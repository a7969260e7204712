"""GGUF weights served as the file stores them, through our own kernel (csrc/gguf_linear.cpp).

PyTorch's packed kernels take int4 groups and int8 rows, so only some GGUF block types map onto them
(layers/gguf_blocks.py) and the rest, among them the Q6_K that a Q4_K_M file uses for its output
layer and half its `attn_v` and `ffn_down`, would be served as dense 16-bit weights, the largest
share of a decode step's bytes. This kernel reads every common block type (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q4_K, Q5_K, Q6_K) as the file stores them: a step of few rows streams the file's bytes per
weight. A linear whose shards mix types (q/k/v in a Q4_K_M file) is one call. Q4_K and Q6_K are also
repacked once at load (16 output rows interleaved, AMX-INT8 tiles' layout, the same bits per weight),
which steps of `repacked_min_rows()` rows read with the same integer arithmetic: on AMX tiles where the
CPU has them (`TILE_MIN_ROWS`), else on the AVX-512 units (`VECTOR_MIN_ROWS`).

Accuracy: weights are the file's exactly; activations are rounded to int16 per group of 32 or 256 with
a power-of-two step (exact for every bf16 value within 2^7 of its group's largest), and the products
are summed exactly in int32 — closer to the dense product than bf16 activations' own rounding.
`ERROR_BOUND` is the bound tests/test_gguf_native.py checks against `gguf`'s dequantization.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from tinyserve import native
from tinyserve.layers import bf16_gemm
from tinyserve.layers.formats import GGUFTensor
from tinyserve.layers.packed import PackedWeight
from tinyserve.system import cpu_flags

SOURCE = Path(__file__).parent / "csrc" / "gguf_linear.cpp"
# GGML's type ids (the kernel's `qtypes`) for the block types it reads.
QTYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
# Steps of this many rows or more multiply a shard of the type on AMX tiles, where it has them. The
# tiles' time hardly grows with rows (decoding the weights into tiles is most of it), the int16
# products' does. The 1.5B's 56 gate/up matrices (Q4_K) took 33.2 / 53.3 / 65.9 ms at 4 / 6 / 8 rows on
# the int16 path and 40.4 / 41.1 / 42.7 ms on tiles; its Q6_K matrices (the LM head, half the down and v
# projections) 31.5 / 30.8 / 47.7 / 56.0 ms at 6 / 8 / 10 / 16 rows and 39.4 / 35.8 / 38.5 / 45.1 on tiles
# (2 threads, Xeon with AMX; `python -m tinyserve_lab.ablations.gguf_kernel --rows 4 8 16` compares
# every matrix of a model, kernels ours vs ours-repacked).
TILE_MIN_ROWS = {"Q4_K": 6, "Q6_K": 10}
# Without AMX, the vector units read the repacked form from this many rows (REPORT section VR).
VECTOR_MIN_ROWS = {"Q4_K": 1, "Q6_K": 3}
# |y - x W^T| <= ERROR_BOUND * sum_k |w_k| * max|x| over the activation group (int16 rounding: 2^-15
# of the group's magnitude, halved), plus fp32 accumulation.
ERROR_BOUND = 2.0**-15


def _fake(x, weights, qtypes, repacked=None, repacked_min_rows=None):  # shapes for torch.export
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


OPS = native.NativeOps(SOURCE, {"tinyserve::gguf_linear": _fake},
                       "GGUF blocks go to PyTorch's int4 kernel or dense instead")


def kernel_available() -> bool:
    """Whether the kernel is built and loaded; False (and one log line) where it cannot be built."""
    return OPS.available()


@functools.cache
def repack_available() -> bool:
    """Whether Q4_K and Q6_K weights get a repacked form here (16 rows interleaved): the kernel built
    with AVX-512 VNNI, which reads it on the vector units, or on AMX tiles where the CPU has them."""
    probe = torch.zeros(16, 144, dtype=torch.uint8)
    return kernel_available() and torch.ops.tinyserve.gguf_repack(probe, QTYPES["Q4_K"]).numel() > 0


@functools.cache
def tiles_available() -> bool:
    """Whether repacked weights multiply on AMX tiles here: the kernel built with AMX-INT8 (a CPU that
    has it) and the OS granting this process tile data."""
    return kernel_available() and bool(torch.ops.tinyserve.gguf_tiles())


def repacked_min_rows() -> dict[str, int]:
    """Steps of this many rows or more read a type's repacked form instead of the file's blocks."""
    return TILE_MIN_ROWS if tiles_available() else VECTOR_MIN_ROWS


def supports(shards: Sequence[object]) -> bool:
    return all(isinstance(s, GGUFTensor) and s.qtype in QTYPES for s in shards)


def vectorized() -> bool:
    """Whether this CPU gets the kernel's AVX-512 VNNI path (it is built with -march=native); elsewhere
    it runs a portable scalar loop, correct but slower than PyTorch's int4 kernel."""
    return {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()


class GGUFWeight(PackedWeight):
    """A linear's GGUF tensors as stored, one buffer per shard (uint8 [N_i, row_bytes_i]); with `repack`,
    also a repacked form (`gguf_repack`: the same bits per weight, 16 rows interleaved) of each Q4_K and
    Q6_K shard, which steps of `repacked_min_rows()` rows or more read instead: on AMX tiles where the CPU
    has them, else on the AVX-512 units."""

    def __init__(self, shards: Sequence[GGUFTensor], dense: torch.Tensor | None, repack: bool = False) -> None:
        super().__init__(dense)
        self.qtypes = [QTYPES[s.qtype] for s in shards]
        self.names = []
        for i, s in enumerate(shards):
            self.register_buffer(f"blocks{i}", s.data)
            self.names.append(f"blocks{i}")
        # empty where a shard has no repacked form (see gguf_repack; rows not in 16s)
        repacked = ([torch.ops.tinyserve.gguf_repack(s.data, q) for s, q in zip(shards, self.qtypes)]
                    if repack and repack_available() else [])
        self.repacked_names = []
        if any(r.numel() for r in repacked):
            for i, r in enumerate(repacked):
                self.register_buffer(f"repacked{i}", r)
                self.repacked_names.append(f"repacked{i}")
        thresholds = repacked_min_rows()
        self.min_rows = [thresholds.get(s.qtype, 1 << 30) for s in shards]
        types = sorted({s.qtype for s in shards})
        suffix = ("+tiles" if tiles_available() else "+repacked") if self.repacked_names else ""
        self.kind = "gguf-" + "+".join(types) + suffix

    def _reads_repacked(self, rows: int, shard: int) -> bool:
        """Whether a step of `rows` reads the shard's repacked form (the kernel's own choice, mirrored)."""
        return bool(self.repacked_names) and getattr(self, self.repacked_names[shard]).numel() > 0 and \
            rows >= self.min_rows[shard]

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [getattr(self, n) for n in self.names]
        repacked = [getattr(self, n) for n in self.repacked_names] or None
        return torch.ops.tinyserve.gguf_linear(x, blocks, self.qtypes, repacked, self.min_rows)

    def bytes_read(self, rows: int) -> int:
        if self.has_copy and rows > self.packed_max_rows:
            return super().bytes_read(rows)
        return sum(getattr(self, self.repacked_names[i] if self._reads_repacked(rows, i) else n).nbytes
                   for i, n in enumerate(self.names))


def gguf_weight(shards: Sequence[GGUFTensor], dtype: torch.dtype, device: torch.device,
                keep_dense: bool, repack: bool = False) -> GGUFWeight | None:
    """The shards as one weight on the kernel; None where it cannot serve them (not a CPU, no compiler).
    `repack`: also the repacked form of its Q4_K and Q6_K shards, where this CPU reads one."""
    if device.type != "cpu" or not kernel_available():
        return None
    dense = dequantize_into(shards, dtype, packed=bf16_gemm.enabled(dtype, device)) if keep_dense else None
    return GGUFWeight([GGUFTensor(s.qtype, s.data.contiguous(), s.shape) for s in shards], dense, repack)


def dequantize_into(shards: Sequence[GGUFTensor], dtype: torch.dtype, chunk: int = 4096,
                    packed: bool = False) -> torch.Tensor:
    """The shards dequantized into one `dtype` matrix, stacked along N: by the kernel (`gguf_dequantize`,
    bit for bit `gguf`'s values) where it is loaded already (never built for this alone: a dense model's
    embedding is no reason to compile) and writes `dtype`, else `chunk` rows at a time in torch ops (a
    150k-row head is ~1 GB in fp32). `packed` (bf16, shards of whole 16-row blocks): in bf16_gemm's layout,
    each `chunk` rows dequantized into a scratch matrix and packed from the caches (packing the whole
    matrices afterwards added 3-4 s to the 1.5B's load)."""
    rows_total, cols = sum(s.shape[0] for s in shards), shards[0].shape[1]
    packed = packed and dtype == torch.bfloat16 and all(bf16_gemm.fits(s.shape[0], cols) for s in shards)
    if packed:  # chunks of whole blocks
        chunk = max(bf16_gemm.LANES, chunk // bf16_gemm.LANES * bf16_gemm.LANES)
    out = (torch.empty(rows_total // bf16_gemm.LANES, cols // 2, 2 * bf16_gemm.LANES, dtype=dtype) if packed
           else torch.empty(rows_total, cols, dtype=dtype))
    native_ok = OPS.loaded and dtype in (torch.float32, torch.bfloat16)
    scratch = torch.empty(min(chunk, rows_total), cols, dtype=dtype) if packed else None
    r0 = 0
    for t in shards:
        rows = t.shape[0]
        for r in range(0, rows, chunk):
            e = min(r + chunk, rows)
            dst = out[r0 + r : r0 + e] if scratch is None else scratch[: e - r]
            if native_ok and t.qtype in QTYPES:
                torch.ops.tinyserve.gguf_dequantize(t.data[r:e].contiguous(), QTYPES[t.qtype], dst)
            else:
                dst.copy_(GGUFTensor(t.qtype, t.data[r:e], (e - r, cols)).dequantize())
            if scratch is not None:
                lanes = bf16_gemm.LANES
                bf16_gemm.pack(dst, out[(r0 + r) // lanes : (r0 + e) // lanes])
        r0 += rows
    return out
