"""Paged attention in plain PyTorch (the reference back end; it is also the CPU fast path).

The KV pool of one layer is a tensor [num_blocks, block_size, num_kv_heads, head_dim]. A step's
tokens arrive as one flat batch: first the decode tokens (one query each), then the prefill chunks.
Every layer first writes its new K/V into the pool at `slot_mapping`, then reads each sequence's
context back through its block table. All indexing tensors are built once per step by the runner
(`AttentionMetadata`) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """Query tokens [start, start + num_tokens) of the flat batch, at context positions
    [num_cached, num_cached + num_tokens) of their sequence."""

    start: int
    num_tokens: int
    num_cached: int
    block_table: torch.Tensor | None  # [n_blocks] int64; None when there is no cached context
    mask: torch.Tensor | None  # [1, 1, q, ctx] bool; None when is_causal suffices


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes in the flat pool
    num_decodes: int  # the first num_decodes tokens are single-query decodes
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64 (padded with block 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] bool: key < context length
    prefills: list[PrefillChunk]


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, nb] block ids -> the sequences' contiguous K or V as [B, kv_heads, nb * block_size, dim]."""
    b, nb = block_tables.shape
    _, bs, h, d = cache.shape
    return cache[block_tables].view(b, nb * bs, h, d).transpose(1, 2)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the pool, attend every query to its context; returns [T, H, D]."""
    _, _, h_kv, d = k_cache.shape
    k_cache.view(-1, h_kv, d).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, h_kv, d).index_copy_(0, meta.slot_mapping, v)
    gqa = q.shape[1] != h_kv
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        assert meta.decode_block_tables is not None
        qd = q[:nd].unsqueeze(2)  # [B, H, 1, D]
        kd = _gather(k_cache, meta.decode_block_tables)
        vd = _gather(v_cache, meta.decode_block_tables)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa)
        out[:nd] = o.squeeze(2)
    for c in meta.prefills:
        qc = q[c.start : c.start + c.num_tokens].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        if c.block_table is None:  # a fresh prompt: its own K/V are the whole context
            kc = k[c.start : c.start + c.num_tokens].transpose(0, 1).unsqueeze(0)
            vc = v[c.start : c.start + c.num_tokens].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=gqa)
        else:  # a later chunk: read the cached prefix and itself back from the pool
            bt = c.block_table.unsqueeze(0)
            ctx = c.num_cached + c.num_tokens
            kc = _gather(k_cache, bt)[:, :, :ctx]
            vc = _gather(v_cache, bt)[:, :, :ctx]
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, scale=scale, enable_gqa=gqa)
        out[c.start : c.start + c.num_tokens] = o.squeeze(0).transpose(0, 1)
    return out
