"""The `paged` back end: decodes read the KV pool in place, through a small native CPU kernel.

csrc/paged_decode.cpp scores each K row against the query heads that share it and sums V rows in
the same pass order, straight out of the pool's blocks: no gathered copy of the context. It is
compiled on first use for this machine and cached (tinyserve/native.py). Prompts (and prompt chunks)
of a bf16 engine take another kernel of ours where the CPU has AVX512-BF16 (prefill.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tinyserve.native import load_kernel

from . import prefill as fast_prefill
from .base import AttentionBackend, DecodeMeta, PrefillChunk, chunk_context

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"


@functools.cache
def load_native() -> None:
    """Build (once per machine) and load the kernel; raises RuntimeError when it cannot be built."""
    try:
        load_kernel(SOURCE)
    except RuntimeError as e:
        raise RuntimeError(f"{e}; use --attention-backend sdpa") from e

    @torch.library.register_fake("tinyserve::paged_decode")
    def _(q, k_cache, v_cache, block_tables, context_lens, scale):  # shapes for torch.compile
        return torch.empty_like(q)


class PagedBackend(AttentionBackend):
    name = "paged"
    index_dtype = torch.int32

    def __init__(self) -> None:
        load_native()

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta,
               scale: float) -> torch.Tensor:
        # A copy, not q.contiguous(): q is a view of the fused QK projection, contiguous only when it
        # has one row, and asking would make torch.compile guard on (specialize) batch 1.
        q = q.clone(memory_format=torch.contiguous_format)
        return torch.ops.tinyserve.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, c: PrefillChunk, scale: float) -> torch.Tensor:
        if not fast_prefill.usable(q):
            return super().prefill(q, k, v, k_cache, v_cache, c, scale)
        qc = q[c.start : c.start + c.num_tokens]
        if c.block_table is None:  # a fresh prompt: its own K/V are the whole context
            return fast_prefill.attend(qc, k[c.start : c.start + c.num_tokens], v[c.start : c.start + c.num_tokens],
                                       scale)
        kc, vc = chunk_context(k_cache, v_cache, c, q.dtype)  # [Hkv, ctx, D]: the kernel reads [ctx, Hkv, D] views
        return fast_prefill.attend(qc, kc.transpose(0, 1), vc.transpose(0, 1), scale)
