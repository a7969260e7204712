"""Owns the model and the KV pool; turns a scheduled batch into flat tensors and runs the forward.

Packing order: decode rows first, then the prefill chunks. A decode row is one query attending
to its context through the back end's decode kernel; a sequence's span runs as decode rows when it
is a decode, a decode with drafts (speculation: its last token and the k drafts, one row each, row
i seeing the context up to itself) or a short span over a cached context (`DECODE_ROWS`: a draft
model catching up on the tokens its target accepted). Rows of one sequence share its block table;
the step writes all their K/V before any row attends, so each sees its predecessors. A step of
decode rows alone can run the compiled graph (worker/compiled.py), speculation included.
Only the positions that sample get logits: the last one of a sequence whose uncomputed tokens are
all fed this step, plus one per draft. The LM head (hidden x vocab) is the largest matmul per token,
and prompt positions need it only for a request that asked for `prompt_logprobs`, which alone pays
for its rows.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch

from tinyserve.attention.base import AttentionMetadata, BatchLayout, SeqSpan
from tinyserve.config import ModelConfig
from tinyserve.errors import EngineFatalError
from tinyserve.kv.quant import pool_dtype, row_width
from tinyserve.models.llama import LlamaForCausalLM
from tinyserve.worker.compiled import BackgroundCompile, CompiledDecode, decode_forward, dummy_decode_inputs
from tinyserve.worker.cuda_graphs import GraphPool

if TYPE_CHECKING:
    from tinyserve.worker.tp_ranks import Ranks

log = logging.getLogger(__name__)
DECODE_ROWS = 8  # a span over a cached context of at most this many tokens runs as decode rows


class Fed(Protocol):
    """What the runner reads of a sequence: the engine's `Sequence`, or a `SeqView`."""

    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    spec_token_ids: list[int]

    @property
    def num_tokens(self) -> int: ...

    def prompt_positions_to_score(self, lo: int, hi: int) -> range: ...


S = TypeVar("S", bound=Fed)


@dataclass(eq=False)
class SeqView:
    """A sequence as the runner reads it, with no scheduler behind it: a draft model's record of a
    target sequence (speculative/draft.py), or a hand-built step of a chosen shape (the lab's probe)."""

    token_ids: list[int]
    block_table: list[int]
    num_computed: int = 0
    spec_token_ids: list[int] = field(default_factory=list)  # rows fed after the last token, if any

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def prompt_positions_to_score(self, lo: int, hi: int) -> range:
        return range(0)


@dataclass
class PreparedBatch(Generic[S]):
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    layout: BatchLayout  # what `meta` was built from (tensor-parallel ranks build their own from it)
    meta: AttentionMetadata
    sample_idx: torch.Tensor  # [S]: rows of the flat batch whose logits we sample from
    sampling: list[S]  # the sequences that sample, in that order (1 + len(spec_token_ids) rows each)
    prompt_idx: torch.Tensor | None  # [R]: rows whose logits score prompt tokens (None: nobody asked)
    prompt_spans: list[tuple[S, range]]  # the sequences and positions of those R rows, in order


@dataclass
class StepLogits(Generic[S]):
    """One step's fp32 logits: the rows that sample now, and the prompt positions asked to be scored."""

    logits: torch.Tensor  # [rows, vocab]: 1 + len(spec_token_ids) consecutive rows per sampling sequence
    sampling: list[S]
    prompt_logits: torch.Tensor  # [R, vocab]
    prompt_spans: list[tuple[S, range]]


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, cfg: ModelConfig, num_blocks: int, block_size: int,
        dtype: torch.dtype, device: str, kv_cache_dtype: str = "auto",
    ) -> None:
        self.model = model
        self.dtype = dtype  # the activations' (a quantized pool's own dtype says its format: kv/quant.py)
        self.compiled: CompiledDecode | None = None  # runs the pure decode steps once set
        self.building: BackgroundCompile | None = None  # ... when this build is done (adopt_compiled)
        self.pending: tuple[CompiledDecode, Path] | None = None  # what it builds, and where
        self.compile_failed = False  # a blocking build raised: eager, and /health says so
        self.graphs: GraphPool | None = None  # CUDA graphs: the decode steps the compiled step does not run
        # Batch-invariant mode: a step mixing decode rows and prefill chunks runs as two forwards, so a
        # decode row takes the compiled graph whatever shares its step (eager rounds differently).
        self.split_mixed_steps = False
        self.ranks: Ranks | None = None  # tensor parallelism: the other ranks, which run every forward too
        self.block_size = block_size
        self.device = torch.device(device)
        # One block past the engine's pool: the scratch block, which the block manager never hands out,
        # so warm-ups and timing steps can write K/V there while sequences are served.
        self.scratch_block = num_blocks
        # The model's own KV heads: under tensor parallelism, this rank's share of the pool.
        shape = (num_blocks + 1, block_size, model.num_kv_heads, row_width(cfg.head_dim, kv_cache_dtype))
        pool = pool_dtype(kv_cache_dtype, dtype)
        # Allocated once; its size is the engine's KV budget. zeros, not empty: padding slots are read
        # (and masked), and NaN garbage times a zero weight would still be NaN.
        self.kv_caches = [
            (torch.zeros(shape, dtype=pool, device=device), torch.zeros(shape, dtype=pool, device=device))
            for _ in range(cfg.num_layers)
        ]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    @property
    def compiled_step(self) -> str:
        """off | building | ready | failed: which decode step serves (what /health and /metrics say).
        A finished build counts as ready: the next step loads it before it runs (`adopt_compiled`)."""
        job = self.building
        if self.compiled is not None or (job is not None and job.ok and self.pending is not None):
            return "ready"
        if job is not None:
            return "failed" if job.done() else "building"
        return "failed" if self.compile_failed else "off"

    def adopt_compiled(self) -> None:
        """Once the background build is done, load its packages (milliseconds) and serve from them: called
        between steps, on the engine's thread, so a step never changes path midway."""
        job = self.building
        if self.pending is None or job is None or not job.done():  # pending first: no syscall once adopted
            return
        step, cache = self.pending
        self.pending = None
        seconds = time.monotonic() - job.started
        if job.ok and step.load(self.kv_caches, self.model.attention.index_dtype, self.scratch_block, cache):
            self.compiled = step
            log.info("full speed: the compiled decode step serves from now on (built in the background in %.0fs)",
                     seconds)
            return
        log.warning("the background build of the compiled decode step failed (exit status %s, after %.0fs); "
                    "serving stays eager", job.proc.returncode, seconds)

    @torch.inference_mode()  # the step's tensors are inference tensors, as the compiled graphs expect
    def execute(self, seqs: Seq[S], num_tokens: Seq[int]) -> StepLogits[S]:
        """Run `num_tokens[i]` tokens of each `seqs[i]` (from its `num_computed` on) in one forward; the
        logits of the sequences that sample now and of the prompt rows asked to be scored."""
        self.adopt_compiled()
        if self.split_mixed_steps and self.compiled is not None:
            rows = [self._as_rows(s, n) for s, n in zip(seqs, num_tokens)]
            if any(rows) and not all(rows):
                parts = [self._execute([s for s, r in zip(seqs, rows) if r == kind],
                                       [n for n, r in zip(num_tokens, rows) if r == kind]) for kind in (True, False)]
                # Decode rows first, as one forward would order them (prepare): the same rows in the same order.
                return StepLogits(_cat([p.logits for p in parts]), parts[0].sampling + parts[1].sampling,
                                  _cat([p.prompt_logits for p in parts]), parts[0].prompt_spans + parts[1].prompt_spans)
        return self._execute(seqs, num_tokens)

    def _execute(self, seqs: Seq[S], num_tokens: Seq[int]) -> StepLogits[S]:
        prepared = self.prepare(seqs, num_tokens)
        if self.ranks is None:
            logits, prompt_logits = self.forward(prepared)
        else:
            self.ranks.step(prepared)  # raises EngineFatalError if a rank is gone
            try:
                logits, prompt_logits = self.forward(prepared)
            except Exception as e:  # the ranks' collectives are out of step now: nothing can be retried
                raise EngineFatalError(f"a tensor-parallel step failed: {type(e).__name__}: {e}") from e
        return StepLogits(logits, prepared.sampling, prompt_logits, prepared.prompt_spans)

    @torch.inference_mode()
    def forward(self, b: PreparedBatch[S]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the sampling rows and of the prompt rows, in separate LM-head calls: the sampled
        rows' numerics never depend on whether a neighbour asked for prompt logprobs."""
        d = b.meta.decode
        graphed = self.compiled is not None or self.graphs is not None
        if graphed and d is not None and not b.meta.prefills and b.prompt_idx is None:
            # A step of decode rows alone: the graph gives every row's logits (catch-up rows too).
            logits = self.decode(b.input_ids, b.positions, b.meta.slot_mapping, d.block_tables, d.context_lens)
            if b.sample_idx.shape[0] != logits.shape[0]:
                logits = logits[b.sample_idx]
            return logits, logits.new_empty(0)
        hidden = self.model(b.input_ids, b.positions, self.kv_caches, b.meta)
        logits = self.model.compute_logits(hidden[b.sample_idx]) if b.sampling else hidden.new_empty(0)
        if b.prompt_idx is None:
            return logits, hidden.new_empty(0)
        return logits, self.model.compute_logits(hidden[b.prompt_idx])

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
               block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """The fp32 logits of a pure decode step from its tensors: the compiled graph if there is one, else
        a CUDA graph where one fits."""
        if self.compiled is not None:
            return self.compiled(input_ids, positions, self.kv_caches, slot_mapping, block_tables, context_lens)
        if self.graphs is not None:
            logits = self.graphs(input_ids, positions, slot_mapping, block_tables, context_lens)
            if logits is not None:
                return logits
        return decode_forward(self.model, input_ids, positions, self.kv_caches, slot_mapping, block_tables,
                              context_lens, self.block_size)

    @torch.inference_mode()
    def decode_step_seconds(self, rows: list[int], repeats: int = 5) -> dict[int, float]:
        """Median seconds of a pure decode step of each row count, as served (what speculation weighs its
        drafts against). The dummy rows touch only the scratch block."""
        out = {}
        for b in rows:
            args = dummy_decode_inputs(b, self.device, self.model.attention.index_dtype, self.scratch_block,
                                       self.block_size)
            samples = []
            for i in range(repeats + 1):  # the first run warms caches
                start = time.perf_counter()
                self.decode(*args)
                if i:
                    samples.append(time.perf_counter() - start)
            out[b] = statistics.median(samples)
        return out

    def prepare(self, seqs: Seq[S], num_tokens: Seq[int]) -> PreparedBatch[S]:
        """Pack the spans into flat tensors (token ids, positions, KV slots); the attention back end
        turns the layout into its own metadata."""
        rows = [self._as_rows(seqs[i], n) for i, n in enumerate(num_tokens)]
        order = sorted(range(len(seqs)), key=lambda i: not rows[i])  # decode rows first
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        prompt_idx: list[int] = []
        sampling: list[S] = []
        prompt_spans: list[tuple[S, range]] = []
        decodes: list[SeqSpan] = []
        prefills: list[SeqSpan] = []
        bs = self.block_size
        for i in order:
            seq, n = seqs[i], num_tokens[i]
            start, lo, hi = len(input_ids), seq.num_computed, seq.num_computed + n
            table, spec = seq.block_table, seq.spec_token_ids
            input_ids += seq.token_ids[lo:hi] if not spec else seq.token_ids[lo:] + spec[: hi - seq.num_tokens]
            positions += range(lo, hi)
            slots += [table[p // bs] * bs + p % bs for p in range(lo, hi)]
            if rows[i]:
                decodes += [SeqSpan(start + j, 1, lo + j, table) for j in range(n)]
            else:
                prefills.append(SeqSpan(start, n, lo, table))
            if hi == seq.num_tokens + len(spec):  # every token fed: the last one samples, and each draft
                sample_idx += range(start + n - 1 - len(spec), start + n)
                sampling.append(seq)
            if scored := seq.prompt_positions_to_score(lo, hi):
                prompt_idx += [start + p - lo for p in scored]
                prompt_spans.append((seq, scored))
        layout = BatchLayout(decodes, prefills, self._tensor(slots), bs, self.device)
        meta = self.model.attention.build(layout)
        return PreparedBatch(self._tensor(input_ids), self._tensor(positions), layout, meta, self._tensor(sample_idx),
                             sampling, self._tensor(prompt_idx) if prompt_idx else None, prompt_spans)

    @staticmethod
    def _as_rows(seq: Fed, n: int) -> bool:
        """Whether a span runs as decode rows (see the module docstring); prompt scoring needs the
        prefill path's every position anyway."""
        if n == 1 or seq.spec_token_ids:
            return True
        return seq.num_computed > 0 and n <= DECODE_ROWS and not seq.prompt_positions_to_score(seq.num_computed,
                                                                                             seq.num_computed + n)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Row blocks stacked, skipping the empty ones (a part with no such rows is a 0-element tensor)."""
    full = [p for p in parts if p.numel()]
    return torch.cat(full) if full else parts[0]
