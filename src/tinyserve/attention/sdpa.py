"""The reference back end: gather each sequence's blocks into a contiguous copy, then one SDPA call.

Runs on any device PyTorch runs on. The copy is its cost: every K/V row of every decode's context
is read from the pool, written to a temporary and read again, per layer and step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, DecodeMeta, gather_blocks


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def decode_meta(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> DecodeMeta:
        keys = torch.arange(block_tables.shape[1] * block_size, device=block_tables.device)
        mask = (keys[None, :] < context_lens[:, None])[:, None, None, :]
        return DecodeMeta(block_tables, context_lens, mask)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta,
               scale: float) -> torch.Tensor:
        """All decodes in one SDPA call. The G query heads that share a KV head sit at the same position,
        so they are passed as G queries of that KV head: each K/V row is read once per KV head instead
        of once per query head (2.3x faster than enable_gqa at B=32, 144 tokens; same math)."""
        b, h, d = q.shape
        h_kv = k_cache.shape[2]
        qg = q.view(b, h_kv, h // h_kv, d)
        k = gather_blocks(k_cache, meta.block_tables, q.dtype)
        v = gather_blocks(v_cache, meta.block_tables, q.dtype)
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.mask, scale=scale).reshape(b, h, d)
