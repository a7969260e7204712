"""The `triton` back end: decodes and prefill chunks over cached context read the KV pool in place, on CUDA.

Both go through one Triton kernel (triton_kernel.py); a fresh prompt, whose context is its own K/V
in hand, goes through SDPA as in every back end (flash attention on a GPU). Imported only when the
back end is chosen: importing Triton costs start-up time.
"""

from __future__ import annotations

import torch

from .base import AttentionBackend, DecodeMeta, PrefillChunk
from .triton_kernel import paged_attention


class TritonBackend(AttentionBackend):
    """Runs wherever Triton runs its kernels: CUDA tensors, or CPU ones under TRITON_INTERPRET=1 (the
    tests'; the factory in __init__.py offers it for CUDA only)."""

    name = "triton"
    index_dtype = torch.int32

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta,
               scale: float) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, c: PrefillChunk, scale: float) -> torch.Tensor:
        if c.block_table is None:
            return super().prefill(q, k, v, k_cache, v_cache, c, scale)
        context_len = torch.full((1,), c.num_cached + c.num_tokens, dtype=torch.int32, device=q.device)
        return paged_attention(q[c.start : c.start + c.num_tokens], k_cache, v_cache, c.block_table[None],
                               context_len, scale, num_q=c.num_tokens)
