"""Tensor parallelism, Megatron-style: which slice of the model a rank holds, and the collectives.

Each rank holds a contiguous range of KV heads with the query heads that attend to them (q/k/v and the
KV pool split by head), a range of the MLP's intermediate columns (gate/up), and a range of the
vocabulary (embedding and LM head). o_proj and down_proj take the matching input columns, so each
rank computes a partial sum of their outputs and one all-reduce per projection completes it: two per
layer, plus one for the embedding. The LM head's logits are gathered to rank 0, the only rank that samples.

Splits need not be even: SmolLM2-135M's 3 KV heads go 2 + 1 over two ranks (Megatron and vLLM ask
for divisibility; a sum does not care, the slower rank just sets the pace). A rank must hold at least
one KV head, so the TP size is at most the number of KV heads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tinyserve.config import ModelConfig
from tinyserve.layers import bf16_gemm
from tinyserve.layers.formats import GGUFTensor, QuantizedTensor, WeightSource, as_dense
from tinyserve.parallel.shm import ShmComm

Range = tuple[int, int]  # [lo, hi)


def split(n: int, parts: int, unit: int = 1) -> list[Range]:
    """`n` (a multiple of `unit`) cut into `parts` contiguous ranges of whole units, the first ones
    one unit larger where it does not divide evenly."""
    units = n // unit
    base, extra = divmod(units, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + (base + (i < extra)) * unit
        out.append((lo, hi))
        lo = hi
    return out


def _unit(n: int, parts: int) -> int:
    """The coarsest alignment a split of `n` into `parts` can keep (256: a GGUF K-quant super-block;
    32: a legacy block and the common quantization group), so quantized weights split between blocks."""
    return next(u for u in (256, 32, 1) if n % u == 0 and n // u >= parts)


@dataclass(frozen=True)
class Partition:
    """The slice of the model that `rank` of `world` holds (element ranges of the full dimensions)."""

    rank: int
    world: int
    kv_heads: Range
    heads: Range
    intermediate: Range
    vocab: Range
    vocab_size: int  # the whole vocabulary

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, world: int) -> Partition:
        if world > cfg.num_kv_heads:
            raise ValueError(f"tensor_parallel_size={world} exceeds the model's {cfg.num_kv_heads} KV heads: "
                             "each rank holds at least one")
        groups = cfg.num_heads // cfg.num_kv_heads
        kv = split(cfg.num_kv_heads, world)[rank]
        vocab = split(cfg.vocab_size, world)
        return cls(rank, world, kv, (kv[0] * groups, kv[1] * groups),
                   split(cfg.intermediate_size, world, _unit(cfg.intermediate_size, world))[rank],
                   vocab[rank], cfg.vocab_size)

    @property
    def vocab_ranges(self) -> list[Range]:
        """Every rank's vocabulary range, in rank order."""
        return split(self.vocab_size, self.world)

    def weight_slice(self, module: str, head_dim: int) -> tuple[int, Range] | None:
        """(dim, element range) of a weight of the HF module `module` (its last name) that this rank
        holds; None when every rank holds all of it (norms). dim 0: rows (column-parallel: q/k/v, gate/up,
        embedding, LM head); dim 1: columns (row-parallel: o_proj, down_proj)."""
        heads = (self.heads[0] * head_dim, self.heads[1] * head_dim)
        kv = (self.kv_heads[0] * head_dim, self.kv_heads[1] * head_dim)
        return {"q_proj": (0, heads), "k_proj": (0, kv), "v_proj": (0, kv), "o_proj": (1, heads),
                "gate_proj": (0, self.intermediate), "up_proj": (0, self.intermediate),
                "down_proj": (1, self.intermediate), "embed_tokens": (0, self.vocab),
                "lm_head": (0, self.vocab)}.get(module)


def shard(src: WeightSource, dim: int, rng: Range, keep_stored: bool, name: str) -> WeightSource:
    """`src`'s slice [lo, hi) along `dim`. A method that repacks from dense (`keep_stored` false) gets
    the dense slice; one that keeps a stored quantized form gets that form sliced, which along the
    columns must fall on its block/group boundaries (a clear error otherwise, naming the split)."""
    lo, hi = rng
    if isinstance(src, torch.Tensor) or not keep_stored:
        return as_dense(src).narrow(dim, lo, hi - lo)
    if isinstance(src, GGUFTensor):
        rows, cols = src.shape
        if dim == 0:
            return GGUFTensor(src.qtype, src.data[lo:hi], (hi - lo, cols))
        import gguf

        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[src.qtype]]
        _check_aligned(name, lo, hi, block, f"{src.qtype} block")
        return GGUFTensor(src.qtype, src.data[:, lo // block * nbytes: hi // block * nbytes], (rows, hi - lo))
    if isinstance(src, QuantizedTensor):
        def rows_of(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[lo:hi]

        if dim == 0:
            scales = src.scales[lo:hi]
            return QuantizedTensor(src.format, src.bits, src.group, src.q[lo:hi], scales, rows_of(src.zeros))
        if src.format == "int8":  # one scale per row: any column range keeps it
            return QuantizedTensor("int8", src.bits, hi - lo, src.q[:, lo:hi], src.scales, None)
        g = src.group
        _check_aligned(name, lo, hi, g, "quantization group")
        zeros = None if src.zeros is None else src.zeros[:, lo // g: hi // g]
        return QuantizedTensor(src.format, src.bits, g, src.q[:, lo:hi], src.scales[:, lo // g: hi // g], zeros)
    raise TypeError(f"weight {name!r}: cannot shard a {type(src).__name__}")


def _check_aligned(name: str, lo: int, hi: int, unit: int, what: str) -> None:
    if lo % unit or hi % unit:
        raise ValueError(f"tensor parallelism splits {name} at columns [{lo}, {hi}), inside a {unit}-weight {what}: "
                         "serve it with a weight mode that repacks (quantization none, int8, int4 or fp8) or another "
                         "tensor_parallel_size")


@dataclass
class CommStats:
    """What the collectives cost on this rank so far: calls, bytes sent in, seconds spent."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class TensorParallel:
    """A rank's partition and its process group; the model calls the collectives through it. With
    `shm` (CPU ranks on one x86-64 host, parallel/shm.py) the collectives that fit its slots go through
    shared memory instead of gloo; every rank decides the same way (by size), so they stay in step."""

    part: Partition
    group: dist.ProcessGroup | None = None  # None: the default group
    stats: CommStats = field(default_factory=CommStats)
    shm: ShmComm | None = None

    @property
    def rank(self) -> int:
        return self.part.rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place."""
        start = time.perf_counter()
        if self.shm is not None and self.shm.fits(x):
            self.shm.all_reduce(x)
        else:
            dist.all_reduce(x, group=self.group)
        self._count(x, start)
        return x

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """A vocabulary-parallel lookup: each rank embeds the ids in its range (zeros elsewhere), the
        sum over ranks is the full lookup."""
        lo, hi = self.part.vocab
        outside = (ids < lo) | (ids >= hi)
        x = bf16_gemm.embedding((ids - lo).masked_fill(outside, 0), table)
        return self.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's logits [rows, its vocab slice] joined on rank 0 as [rows, vocab]; other ranks
        get an empty tensor (only rank 0 samples)."""
        start = time.perf_counter()
        ranges = self.part.vocab_ranges
        pad = max(hi - lo for lo, hi in ranges) - logits.shape[-1]  # gathers need equal sizes
        local = F.pad(logits, (0, pad)) if pad else logits.contiguous()
        parts: list[torch.Tensor] | None
        if self.shm is not None and self.shm.fits(local):
            parts = self.shm.gather(local)  # views of the shared slots: joined below, before the next collective
        else:
            parts = [torch.empty_like(local) for _ in range(self.part.world)] if self.rank == 0 else None
            dist.gather(local, parts, dst=0, group=self.group)
        self._count(local, start)
        if parts is None:
            return logits.new_empty(0)
        return torch.cat([p[:, : hi - lo] for p, (lo, hi) in zip(parts, ranges)], dim=-1)

    def _count(self, x: torch.Tensor, start: float) -> None:
        self.stats.calls += 1
        self.stats.bytes += x.numel() * x.element_size()
        self.stats.seconds += time.perf_counter() - start

