"""Paged attention in Triton: queries attend to their context straight out of the KV pool's blocks.

One kernel serves decodes and prefill chunks over cached context alike: B sequences, each with
`num_q` queries that are the last `num_q` positions of its context (a decode: one; a chunk: its
tokens), each query seeing the positions up to its own. A chunk is the same problem as a decode with
more queries, so one kernel, not two, and nothing gathered: every K/V row is read once per KV head
from the block the table names (the `sdpa` back end copies the context first).

Why a Triton kernel for chunks too, not FlexAttention with a paged block mask: torch's paged
FlexAttention (torch.nn.attention.experimental.PagedAttention, marked experimental) wants the pool as
one [1, heads, pages x page size, D] tensor, heads outermost, where ours is [blocks, block_size, Hkv,
row] (a layout the CPU kernel, the block manager and the tiers share); its block mask's KV tile must
equal the page size (our 16-token blocks would be its tiles); it is compiled per mask and score
function; and it cannot read the int8 row format (codes and a scale in the row's last bytes). This
kernel already walks the block tables for decodes; a chunk is the same loop with more query rows, and
Triton's interpreter tests both without a GPU.

Each program owns (sequence, KV head, tile of queries): its rows are the G query heads that share
the KV head times the tile's queries (GQA folded into the rows, so a K/V tile is loaded once for all
G heads), and it runs an online softmax over tiles of TILE_N context positions. A tile's positions
may span several blocks of any size: each position's block is looked up in the table. A decode step
runs B x Hkv programs, each one pass over its whole context: long contexts are not yet split over
several programs (flash-decoding), which small batches on a large GPU would want. Tile sizes are plain
choices, not tuned on a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from tinyserve.kv.quant import is_quantized
from tinyserve.triton_dot import dot_operands

TILE_N = 64  # context positions per step of the online softmax
CHUNK_ROWS = 64  # query rows (queries x heads of a KV head) per program for chunks
MIN_ROWS = 16  # tl.dot's smallest M on GPUs: a decode's G rows are padded up to it


@triton.jit
def _load_rows(ptr, offsets, dims, mask, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, dtype: tl.constexpr):
    """[TILE_N, DIM_PAD] K or V rows at `offsets` (element offsets of the rows) in `dtype`. A quantized
    row is D int8 codes then a bf16 scale's two bytes (kv/quant.py), widened to fp32 by its bits. Masked
    positions point into block 0 (the tables' padding), so their scale loads need no mask."""
    rows = tl.load(ptr + offsets[:, None] + dims[None, :], mask=mask, other=0.0)
    if QUANT:
        lo = tl.load(ptr + offsets + HEAD_DIM).to(tl.uint8, bitcast=True).to(tl.int32)
        hi = tl.load(ptr + offsets + HEAD_DIM + 1).to(tl.uint8, bitcast=True).to(tl.int32)
        scale = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)  # a bf16 is an fp32's top half
        return (rows.to(tl.float32) * scale[:, None]).to(dtype)
    if rows.dtype.is_fp8():  # a float8 pool with a unit scale: widened through fp32, a cast every target has
        rows = rows.to(tl.float32)
    return rows.to(dtype)


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, context_lens_ptr,
    scale_log2,  # the softmax scale times log2(e): the loop uses exp2
    num_q,  # queries per sequence
    stride_qt, stride_qh, stride_ot, stride_oh,  # query/output strides (token, head); dims contiguous
    stride_kb, stride_kt, stride_kh,  # pool strides (block, position, head), the same for K and V
    stride_table,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, ROWS: tl.constexpr, TILE_N: tl.constexpr, QUANT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    QUERIES: tl.constexpr = ROWS // GROUP_PAD
    rows = tl.arange(0, ROWS)
    query = tl.program_id(2) * QUERIES + rows // GROUP_PAD  # within the sequence
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (query < num_q) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM

    token = seq * num_q + query
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    dtype = q.dtype
    ctx = tl.load(context_lens_ptr + seq)
    last = ctx - num_q + query  # the last position each query sees (causal within the chunk)
    end = tl.minimum(ctx, ctx - num_q + (tl.program_id(2) + 1) * QUERIES)  # no query here sees beyond

    m = tl.full([ROWS], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    denom = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DIM_PAD], tl.float32)
    for start in range(0, end, TILE_N):
        pos = start + tl.arange(0, TILE_N)
        pos_ok = pos < end
        block = tl.load(tables_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        offsets = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = _load_rows(k_ptr, offsets, dims, kv_mask, HEAD_DIM, QUANT, dtype)
        v = _load_rows(v_ptr, offsets, dims, kv_mask, HEAD_DIM, QUANT, dtype)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale_log2
        # Every row sees position 0 in the first tile, so `m` is finite from then on: no NaN from -inf - -inf.
        s = tl.where(pos[None, :] <= last[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(denom == 0, 1.0, denom)[:, None]  # a padding row of no context: zeros, not NaN
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# A custom op (triton_op) rather than a bare launch: torch.compile and torch.export (the compiled decode
# step, worker/compiled.py) then trace into the kernel instead of failing on its raw pointers.
@torch.library.triton_op("tinyserve::triton_paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, num_q: int = 1) -> torch.Tensor:
    """q [B * num_q, H, D]: B sequences' queries, each sequence's `num_q` in a row, the last positions of
    its context; k_cache, v_cache [blocks, block_size, Hkv, row] (row = D, or D + 2 in the int8 format;
    any float dtype, float8 ones included); block_tables [B, max_blocks]; context_lens [B] -> [B * num_q,
    H, D] in q's dtype."""
    _, h, d = q.shape
    _, block_size, h_kv, _ = k_cache.shape
    if q.stride(-1) != 1:  # any token and head strides are read as they are: q is a view of the QKV projection
        q = q.contiguous()
    group = h // h_kv
    group_pad = triton.next_power_of_2(group)
    rows = max(MIN_ROWS, group_pad, CHUNK_ROWS if num_q > 1 else 0)
    out = torch.empty_like(q)
    b = block_tables.shape[0]
    dot_dtype, precision = dot_operands(q.dtype, q.device)
    grid = (b, h_kv, triton.cdiv(num_q, rows // group_pad))
    wrap_triton(_paged_attention_kernel)[grid](
        q, k_cache, v_cache, out, block_tables, context_lens,
        scale * math.log2(math.e), num_q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d,
        DIM_PAD=max(16, triton.next_power_of_2(d)), ROWS=rows, TILE_N=TILE_N, QUANT=is_quantized(k_cache),
        DOT_DTYPE=dot_dtype, PRECISION=precision,
    )
    return out

