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


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, nb] block ids -> the sequences' contiguous K or V as [B, kv_heads, nb * block_size, dim].
    index_select on the flat table: 1.3 ms vs 3.6 ms for `cache[block_tables]` (B=32, 576 tokens)."""
    b, nb = block_tables.shape
    _, bs, h, d = cache.shape
    return cache.index_select(0, block_tables.flatten()).view(b, nb * bs, h, d).transpose(1, 2)


def decode_attention(
    q: torch.Tensor,  # [B, H, D]: one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    mask: torch.Tensor,  # [B, 1, 1, K]
    scale: float,
) -> torch.Tensor:
    """All decodes in one SDPA call. The G query heads that share a KV head sit at the same position,
    so they are passed as G queries of that KV head: each K/V row is read once per KV head instead
    of once per query head (2.3x faster than enable_gqa at B=32, 144 tokens; same math)."""
    b, h, d = q.shape
    h_kv = k_cache.shape[2]
    qg = q.view(b, h_kv, h // h_kv, d)
    k = gather_blocks(k_cache, block_tables)
    v = gather_blocks(v_cache, block_tables)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale).reshape(b, h, d)


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
    nd = meta.num_decodes
    if nd == q.shape[0]:  # a pure decode step (the common one): no output buffer to fill
        assert meta.decode_block_tables is not None and meta.decode_mask is not None
        return decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_mask, scale)
    gqa = q.shape[1] != h_kv
    out = torch.empty_like(q)
    if nd:
        assert meta.decode_block_tables is not None and meta.decode_mask is not None
        out[:nd] = decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_mask, scale)
    for c in meta.prefills:
        qc = q[c.start : c.start + c.num_tokens].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        if c.block_table is None:  # a fresh prompt: its own K/V are the whole context
            kc = k[c.start : c.start + c.num_tokens].transpose(0, 1).unsqueeze(0)
            vc = v[c.start : c.start + c.num_tokens].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=gqa)
        else:  # a later chunk: read the cached prefix and itself back from the pool
            bt = c.block_table.unsqueeze(0)
            ctx = c.num_cached + c.num_tokens
            kc = gather_blocks(k_cache, bt)[:, :, :ctx]
            vc = gather_blocks(v_cache, bt)[:, :, :ctx]
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, scale=scale, enable_gqa=gqa)
        out[c.start : c.start + c.num_tokens] = o.squeeze(0).transpose(0, 1)
    return out
