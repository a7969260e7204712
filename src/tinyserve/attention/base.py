"""What every attention back end shares: the step's layout, the KV write, prefill chunks.

The KV pool of one layer is a tensor [num_blocks, block_size, num_kv_heads, head_dim]. A step's
tokens arrive as one flat batch: first the decode tokens (one query each), then the prefill chunks.
Every layer first writes its new K/V into the pool at `slot_mapping`, then attends each query to its
context. The runner describes the step once (`BatchLayout`: plain Python, no tensors but the slots);
the back end turns that into its own `AttentionMetadata` (`build`), which every layer then shares.
Back ends differ in how decodes read the pool (`decode`); prefill chunks are shared by all of them
unless a back end overrides `prefill`: a fresh prompt goes through SDPA (causal), a chunk over a cached
context (a later chunk, or a prompt whose prefix came from the prefix cache) through `chunk_attention`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tinyserve.kv.quant import copy_rows, dequantize, is_fp8, is_quantized, quantize, read_rows, to_fp8


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's share of a step: query tokens [start, start + num_tokens) of the flat batch,
    at context positions [num_cached, num_cached + num_tokens); `block_table` covers them all."""

    start: int
    num_tokens: int
    num_cached: int
    block_table: list[int]

    @property
    def context_len(self) -> int:
        return self.num_cached + self.num_tokens


@dataclass
class BatchLayout:
    """A step as the runner packed it: the decode spans (one token each) first, then prefill chunks."""

    decodes: list[SeqSpan]
    prefills: list[SeqSpan]
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes in the flat pool
    block_size: int
    device: torch.device


@dataclass
class PrefillChunk:
    """A prefill span in tensors: its block table and mask exist only when it has cached context."""

    start: int
    num_tokens: int
    num_cached: int
    block_table: torch.Tensor | None  # [n_blocks] int64; None when there is no cached context
    bias: torch.Tensor | None  # [q, ctx] fp32, 0 where a query sees a key, -inf elsewhere; None when is_causal suffices
    _folded: tuple[torch.dtype, int, torch.Tensor] | None = field(default=None, repr=False)

    def folded_bias(self, dtype: torch.dtype, groups: int) -> torch.Tensor:
        """`bias` in `dtype`, repeated for `groups` query heads per KV head ([groups * q, ctx]); made by
        the first layer that asks, shared by the rest."""
        assert self.bias is not None
        if self._folded is None or self._folded[:2] != (dtype, groups):
            self._folded = (dtype, groups, self.bias.to(dtype).repeat(groups, 1))
        return self._folded[2]


@dataclass
class DecodeMeta:
    """The decodes' block tables (padded with block 0) and context lengths, in the back end's
    index dtype; `mask` only for back ends that pad the context and mask it."""

    block_tables: torch.Tensor  # [B, max_blocks]
    context_lens: torch.Tensor  # [B]
    mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] bool: key < context length


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int  # the first num_decodes tokens are single-query decodes
    decode: DecodeMeta | None  # None when the step has no decodes
    prefills: list[PrefillChunk]

    @classmethod
    def fresh_prompt(cls, num_tokens: int, device: torch.device | str) -> AttentionMetadata:
        """One fresh prompt of `num_tokens`, its K/V written from slot 0 (scoring, tests)."""
        return cls(torch.arange(num_tokens, device=device), 0, None, [PrefillChunk(0, num_tokens, 0, None, None)])


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, nb] block ids -> the sequences' contiguous K or V as [B, kv_heads, nb * block_size, dim] in
    `dtype` (a quantized pool's rows dequantized). index_select on the flat table: 1.3 ms vs 3.6 ms for
    `cache[block_tables]` (B=32, 576 tokens)."""
    b, nb = block_tables.shape
    _, bs, h, row = cache.shape
    rows = cache.index_select(0, block_tables.flatten()).view(b, nb * bs, h, row)
    return read_rows(rows, dtype).transpose(1, 2)


def padded_tables(spans: list[SeqSpan], block_size: int) -> list[list[int]]:
    """Each span's blocks up to its context length, padded with block 0 to the longest."""
    tables = [s.block_table[: -(-s.context_len // block_size)] for s in spans]
    width = max(map(len, tables))
    return [t + [0] * (width - len(t)) for t in tables]


class AttentionBackend(ABC):
    """Builds its metadata from a `BatchLayout`; attends a flat batch over the paged pool."""

    name: str
    index_dtype: torch.dtype = torch.long  # dtype of the decode block tables and lengths

    def build(self, layout: BatchLayout) -> AttentionMetadata:
        decode = None
        if layout.decodes:
            decode = self.build_decode(layout)
        return AttentionMetadata(layout.slot_mapping, len(layout.decodes), decode,
                                 [self._prefill_chunk(s, layout) for s in layout.prefills])

    def build_decode(self, layout: BatchLayout) -> DecodeMeta:
        tables = padded_tables(layout.decodes, layout.block_size)
        lens = [s.context_len for s in layout.decodes]
        return self.decode_meta(torch.tensor(tables, dtype=self.index_dtype, device=layout.device),
                                torch.tensor(lens, dtype=self.index_dtype, device=layout.device), layout.block_size)

    def decode_meta(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> DecodeMeta:
        """The decode metadata from its tensors alone: the compiled decode step calls this inside its
        graph, so whatever a back end derives (a mask) is computed there, not per step in Python."""
        return DecodeMeta(block_tables, context_lens)

    @staticmethod
    def _prefill_chunk(span: SeqSpan, layout: BatchLayout) -> PrefillChunk:
        if span.num_cached == 0:
            return PrefillChunk(span.start, span.num_tokens, 0, None, None)
        dev = layout.device
        q_pos = torch.arange(span.num_cached, span.context_len, device=dev)
        hidden = torch.arange(span.context_len, device=dev)[None, :] > q_pos[:, None]  # causal, offset by the prefix
        bias = torch.zeros(hidden.shape, device=dev).masked_fill_(hidden, float("-inf"))
        table = torch.tensor(span.block_table[: -(-span.context_len // layout.block_size)], device=dev)
        return PrefillChunk(span.start, span.num_tokens, span.num_cached, table, bias)

    @abstractmethod
    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta,
               scale: float) -> torch.Tensor:
        """q [B, H, D], one query per sequence -> [B, H, D]."""

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write this step's K/V into the pool, attend every query to its context; returns [T, H, D]."""
        _, _, h_kv, row = k_cache.shape
        if is_fp8(k_cache):  # kv/quant.py; every attention reads the rounded values, as int8's does below
            k, v = to_fp8(k), to_fp8(v)
            copy_rows(k_cache.view(-1, h_kv, row), meta.slot_mapping, k)
            copy_rows(v_cache.view(-1, h_kv, row), meta.slot_mapping, v)
            return self._attend(q, k.to(q.dtype), v.to(q.dtype), k_cache, v_cache, meta, scale)
        if not is_quantized(k_cache):
            k_cache.view(-1, h_kv, row).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(-1, h_kv, row).index_copy_(0, meta.slot_mapping, v)
            return self._attend(q, k, v, k_cache, v_cache, meta, scale)
        # The int8 pool (kv/quant.py): codes and their scale per row (K arrives smoothed by the model,
        # its queries to match). Every attention reads K/V as the pool holds them, a fresh prompt's own
        # too, so a prefix recomputed after preemption gives back the same codes.
        k_rows, v_rows = quantize(k), quantize(v)
        k_cache.view(-1, h_kv, row).index_copy_(0, meta.slot_mapping, k_rows)
        v_cache.view(-1, h_kv, row).index_copy_(0, meta.slot_mapping, v_rows)
        fresh = any(c.block_table is None for c in meta.prefills)  # attends to this step's own K/V
        if fresh:
            k, v = dequantize(k_rows, q.dtype), dequantize(v_rows, q.dtype)
        return self._attend(q, k, v, k_cache, v_cache, meta, scale)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        nd = meta.num_decodes
        if nd == q.shape[0]:  # a pure decode step (the common one): no output buffer to fill
            assert meta.decode is not None
            return self.decode(q, k_cache, v_cache, meta.decode, scale)
        out = torch.empty_like(q)
        if nd:
            assert meta.decode is not None
            out[:nd] = self.decode(q[:nd], k_cache, v_cache, meta.decode, scale)
        for c in meta.prefills:
            out[c.start : c.start + c.num_tokens] = self.prefill(q, k, v, k_cache, v_cache, c, scale)
        return out

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, c: PrefillChunk, scale: float) -> torch.Tensor:
        """One prefill chunk's attention, [L, H, D]: the shared path unless a back end reads the pool its way."""
        return prefill_attention(q, k, v, k_cache, v_cache, c, scale)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, c: PrefillChunk, scale: float) -> torch.Tensor:
    """One chunk's queries against its context, [L, H, D]."""
    qc = q[c.start : c.start + c.num_tokens]
    if c.block_table is None:  # a fresh prompt: its own K/V are the whole context
        gqa = q.shape[1] != k.shape[1]
        kc = k[c.start : c.start + c.num_tokens].transpose(0, 1).unsqueeze(0)
        vc = v[c.start : c.start + c.num_tokens].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qc.transpose(0, 1).unsqueeze(0), kc, vc, is_causal=True, scale=scale,
                                           enable_gqa=gqa)
        return o.squeeze(0).transpose(0, 1)
    kc, vc = chunk_context(k_cache, v_cache, c, q.dtype)
    return chunk_attention(qc, kc, vc, c, scale)


def chunk_context(k_cache: torch.Tensor, v_cache: torch.Tensor, c: PrefillChunk,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A later chunk's context, its cached prefix and itself, read back from the pool: K, V [Hkv, ctx, D]."""
    assert c.block_table is not None
    bt = c.block_table.unsqueeze(0)
    ctx = c.num_cached + c.num_tokens
    return gather_blocks(k_cache, bt, dtype)[0, :, :ctx], gather_blocks(v_cache, bt, dtype)[0, :, :ctx]


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: PrefillChunk, scale: float) -> torch.Tensor:
    """q [L, H, D] against k, v [Hkv, ctx, D] under the chunk's causal bias -> [L, H, D].

    On CPU as two batched GEMMs around a softmax, with the G query heads of a KV head folded into
    its query rows (each K/V row read once per KV head): about 3x faster than SDPA with a mask for a
    short chunk over a long cached prefix (`python -m tinyserve_lab.ablations.chunk_attention`,
    docs/REPORT.md section P). The scores are materialized (L x ctx per head), which a chunk of at
    most max_num_batched_tokens affords.
    Elsewhere SDPA, whose GPU kernels do not materialize."""
    L, h, d = q.shape
    h_kv = k.shape[0]
    g = h // h_kv
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                              attn_mask=c.folded_bias(q.dtype, 1), scale=scale,
                                              enable_gqa=g > 1)[0].transpose(0, 1)
    qf = q.view(L, h_kv, g, d).permute(1, 2, 0, 3).reshape(h_kv, g * L, d)
    scores = torch.baddbmm(c.folded_bias(q.dtype, g).expand(h_kv, -1, -1), qf, k.transpose(1, 2), alpha=scale)
    out = torch.bmm(scores.softmax(-1), v)
    return out.view(h_kv, g, L, d).permute(2, 0, 1, 3).reshape(L, h, d)
