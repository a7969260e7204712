"""Owns the model and the KV pool; turns a scheduled batch into flat tensors and runs the forward.

Packing order: decode tokens first (one per sequence, attended in one batched call), then the
prefill chunks. Only the last position of a sequence whose uncomputed tokens are all fed this step
gets logits: the LM head (hidden x vocab) is the largest matmul per token, and prompt positions
never need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyserve.config import ModelConfig
from tinyserve.engine.scheduler import ScheduledBatch
from tinyserve.engine.sequence import Sequence
from tinyserve.models.llama import LlamaForCausalLM
from tinyserve.ops.attention import AttentionMetadata, PrefillChunk


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_idx: torch.Tensor  # [S]: rows of the flat batch whose logits we sample from
    sampling: list[Sequence]  # the S sequences, in that order


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, cfg: ModelConfig, num_blocks: int, block_size: int,
        dtype: torch.dtype, device: str,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # Allocated once; its size is the engine's KV budget. zeros, not empty: padding slots are read
        # (and masked), and NaN garbage times a zero weight would still be NaN.
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step; returns logits [S, vocab] (fp32) for the S sequences that sample now."""
        prepared = self.prepare(batch)
        return self.forward(prepared), prepared.sampling

    @torch.inference_mode()
    def forward(self, b: PreparedBatch) -> torch.Tensor:
        hidden = self.model(b.input_ids, b.positions, self.kv_caches, b.meta)
        return self.model.compute_logits(hidden[b.sample_idx]) if b.sampling else hidden.new_empty(0)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        """Pack the batch into flat tensors: token ids, positions, KV slots, block tables, masks."""
        order = sorted(range(len(batch)), key=lambda i: batch.num_tokens[i] > 1)  # decodes first
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_tokens[i] for i in order]
        input_ids, positions, slots, sample_idx, sampling = [], [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        bs = self.block_size
        for seq, n in zip(seqs, counts):
            start, lo, hi = len(input_ids), seq.num_computed, seq.num_computed + n
            table = seq.block_table
            input_ids += seq.token_ids[lo:hi]
            positions += range(lo, hi)
            slots += [table[p // bs] * bs + p % bs for p in range(lo, hi)]
            if n == 1:
                decode_tables.append(table[: -(-hi // bs)])
                decode_lens.append(hi)
            else:
                prefills.append(self._prefill_chunk(start, n, lo, table))
            if hi == seq.num_tokens:
                sample_idx.append(start + n - 1)
                sampling.append(seq)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decodes=len(decode_tables),
            decode_block_tables=None,
            decode_mask=None,
            prefills=prefills,
        )
        if decode_tables:
            width = max(map(len, decode_tables))
            meta.decode_block_tables = self._tensor([t + [0] * (width - len(t)) for t in decode_tables])
            keys = torch.arange(width * bs, device=self.device)
            meta.decode_mask = (keys[None, :] < self._tensor(decode_lens)[:, None])[:, None, None, :]
        return PreparedBatch(self._tensor(input_ids), self._tensor(positions), meta, self._tensor(sample_idx), sampling)

    def _prefill_chunk(self, start: int, n: int, num_cached: int, table: list[int]) -> PrefillChunk:
        if num_cached == 0:
            return PrefillChunk(start, n, 0, None, None)
        ctx = num_cached + n
        q_pos = torch.arange(num_cached, ctx, device=self.device)
        mask = torch.arange(ctx, device=self.device)[None, :] <= q_pos[:, None]  # causal, offset by the prefix
        return PrefillChunk(start, n, num_cached, self._tensor(table[: -(-ctx // self.block_size)]), mask[None, None])

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
