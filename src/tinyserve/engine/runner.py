"""Owns the model and the KV pool; turns a scheduled batch into flat tensors and runs the forward.

Packing order: decode tokens first (one per sequence, attended in one batched call), then the
prefill chunks. Only the last position of a sequence whose uncomputed tokens are all fed this step
gets logits: the LM head (hidden x vocab) is the largest matmul per token, and prompt positions
need it only for a request that asked for `prompt_logprobs`, which alone pays for its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyserve.attention import AttentionMetadata, BatchLayout, SeqSpan
from tinyserve.config import ModelConfig
from tinyserve.engine.compiled import CompiledDecode
from tinyserve.engine.scheduler import ScheduledBatch
from tinyserve.engine.sequence import Sequence
from tinyserve.models.llama import LlamaForCausalLM


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_idx: torch.Tensor  # [S]: rows of the flat batch whose logits we sample from
    sampling: list[Sequence]  # the S sequences, in that order
    prompt_idx: torch.Tensor | None  # [R]: rows whose logits score prompt tokens (None: nobody asked)
    prompt_spans: list[tuple[Sequence, range]]  # the sequences and positions of those R rows, in order


@dataclass
class StepLogits:
    """One step's fp32 logits: the rows that sample now, and the prompt positions asked to be scored."""

    logits: torch.Tensor  # [S, vocab]
    sampling: list[Sequence]
    prompt_logits: torch.Tensor  # [R, vocab]
    prompt_spans: list[tuple[Sequence, range]]


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, cfg: ModelConfig, num_blocks: int, block_size: int,
        dtype: torch.dtype, device: str,
    ) -> None:
        self.model = model
        self.compiled: CompiledDecode | None = None  # runs the pure decode steps once the engine sets it
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

    @torch.inference_mode()  # the step's tensors are inference tensors, as the compiled graphs expect
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        """Run one step; returns the logits of the sequences that sample now and of the prompt rows."""
        prepared = self.prepare(batch)
        logits, prompt_logits = self.forward(prepared)
        return StepLogits(logits, prepared.sampling, prompt_logits, prepared.prompt_spans)

    @torch.inference_mode()
    def forward(self, b: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the sampling rows and of the prompt rows, in separate LM-head calls: the sampled
        rows' numerics never depend on whether a neighbour asked for prompt logprobs."""
        d = b.meta.decode
        if self.compiled is not None and d is not None and not b.meta.prefills and b.prompt_idx is None:
            # A pure decode step: every row samples, in order.
            logits = self.compiled(b.input_ids, b.positions, self.kv_caches, b.meta.slot_mapping, d.block_tables,
                                   d.context_lens)
            return logits, logits.new_empty(0)
        hidden = self.model(b.input_ids, b.positions, self.kv_caches, b.meta)
        logits = self.model.compute_logits(hidden[b.sample_idx]) if b.sampling else hidden.new_empty(0)
        if b.prompt_idx is None:
            return logits, hidden.new_empty(0)
        return logits, self.model.compute_logits(hidden[b.prompt_idx])

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        """Pack the batch into flat tensors (token ids, positions, KV slots); the attention back end
        turns the layout into its own metadata."""
        order = sorted(range(len(batch)), key=lambda i: batch.num_tokens[i] > 1)  # decodes first
        input_ids: list[int] = []
        positions: list[int] = []
        slots, sample_idx, sampling, prompt_idx, prompt_spans = [], [], [], [], []
        decodes: list[SeqSpan] = []
        prefills: list[SeqSpan] = []
        bs = self.block_size
        for i in order:
            seq, n = batch.seqs[i], batch.num_tokens[i]
            start, lo, hi = len(input_ids), seq.num_computed, seq.num_computed + n
            table = seq.block_table
            input_ids += seq.token_ids[lo:hi]
            positions += range(lo, hi)
            slots += [table[p // bs] * bs + p % bs for p in range(lo, hi)]
            (decodes if n == 1 else prefills).append(SeqSpan(start, n, lo, table))
            if hi == seq.num_tokens:
                sample_idx.append(start + n - 1)
                sampling.append(seq)
            if scored := seq.prompt_positions_to_score(lo, hi):
                prompt_idx += [start + p - lo for p in scored]
                prompt_spans.append((seq, scored))
        meta = self.model.attention.build(BatchLayout(decodes, prefills, self._tensor(slots), bs, self.device))
        return PreparedBatch(self._tensor(input_ids), self._tensor(positions), meta, self._tensor(sample_idx), sampling,
                             self._tensor(prompt_idx) if prompt_idx else None, prompt_spans)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
