"""A draft model with its own paged KV pool (`draft_model`), or the target's own weights in a cheaper
weight mode (`self`: self-speculation, e.g. an int4 draft of a bf16 target).

Per target sequence the draft keeps the tokens whose K/V its pool holds. Before drafting, that
record is cut back to what still agrees with the target's tokens (rejected drafts disappear here:
the target's tokens only ever grow, so only the last k can disagree), the draft catches up on the
tokens it has not seen (one or two after a verification: decode rows, the compiled graph; a whole
prompt the first time), then runs k - 1 more single-token decode steps, batched over every drafting
sequence. A sequence that the target preempted keeps its draft K/V (its tokens are unchanged);
a draft pool that runs out drops the K/V of sequences that are not running, then drafts less.
A draft step that fails drops the drafts and every draft K/V, and serving carries on undrafted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tinyserve.engine.runner import DECODE_ROWS
from tinyserve.engine.sequence import Sequence, Status
from tinyserve.engine.served_model import serve_model
from tinyserve.kv.block_manager import BlockManager
from tinyserve.models.loader import model_config, resolve_model
from tinyserve.spec.config import SpeculativeConfig
from tinyserve.spec.cost import StepCost, measure_step_seconds, row_counts

if TYPE_CHECKING:
    from tinyserve.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DraftView:
    """A target sequence as the draft's runner sees it (engine/runner.py `Fed`)."""

    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    spec_token_ids: list[int] = field(default_factory=list)  # a draft does not speculate itself

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def prompt_positions_to_score(self, lo: int, hi: int) -> range:
        return range(0)


@dataclass
class _DraftKV:
    tokens: list[int]  # the tokens at positions 0.. whose K/V the draft pool holds
    table: list[int]


class DraftModelProposer:
    def __init__(self, cfg: SpeculativeConfig, engine: LLMEngine) -> None:
        src = engine.source if cfg.method == "self" else resolve_model(cfg.model)
        mc = model_config(src)
        target = engine.model_config
        if mc.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config.model: the draft's vocabulary ({mc.vocab_size} tokens) is not the "
                             f"target's ({target.vocab_size}); a draft must share the target's tokenizer")
        quant = cfg.quantization or ("auto" if cfg.method == "draft_model"
                                     else "gguf" if src.gguf_blocks is not None else "int4")
        if cfg.method == "self" and quant in ("auto", engine.quantization):
            raise ValueError(f"speculative_config.quantization: a self-speculation draft needs a weight mode other "
                             f"than the target's ({engine.quantization!r})")
        self.max_len = min(engine.max_len, mc.max_position_embeddings)
        self.k_max = cfg.num_speculative_tokens
        config = engine.config
        # As many tokens as the target's pool: whatever the target holds, its draft can hold too.
        num_blocks = engine.num_blocks
        served = serve_model(config, src, mc, quant, self.max_len, num_blocks, config.max_num_seqs * DECODE_ROWS)
        self.runner = served.runner
        self.quantization = served.quantization
        self.index_dtype = served.attention.index_dtype
        self.cost = StepCost(measure_step_seconds(self.runner, served.attention.index_dtype,
                                                  row_counts(config.max_num_seqs))) if cfg.adaptive else None
        self.blocks = BlockManager(num_blocks, config.block_size, enable_caching=False)
        self.kv: dict[Sequence, _DraftKV] = {}
        self.probs = engine.sampler.probs  # the draft samples as the target does: temperature, top-k/p, min-p
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed + 1)
        log.info("draft model %s (%s) for speculation: %d KV blocks", src.name, self.quantization, num_blocks)

    def forget(self, live: set[Sequence]) -> None:
        for seq in [s for s in self.kv if s not in live]:
            self.blocks.release(self.kv.pop(seq).table)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        try:
            self._propose(seqs, ks)
        except Exception as e:  # a draft failure costs the speedup, never a request
            log.warning("drafting failed (%s: %s); dropping the drafts and the draft KV", type(e).__name__, e)
            for seq in seqs:
                seq.spec_token_ids, seq.spec_draft_probs = [], None
            for kv in self.kv.values():
                self.blocks.release(kv.table)
            self.kv.clear()

    @torch.inference_mode()
    def _propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        views = [self._view(seq) for seq in seqs]
        ks = [min(k, self.max_len - seq.num_tokens) for seq, k in zip(seqs, ks)]
        drafts: list[list[int]] = [[] for _ in seqs]
        q_rows: list[list[torch.Tensor]] = [[] for _ in seqs]
        for r in range(max(ks, default=0)):
            active = [i for i, k in enumerate(ks) if k > r and self._room(seqs[i], views[i])]
            if not active:
                break
            out = self.runner.execute_spans([views[i] for i in active],
                                            [views[i].num_tokens - views[i].num_computed for i in active])
            rand = [n for n, i in enumerate(active) if not seqs[i].params.greedy]
            tokens = out.logits.argmax(-1)
            if rand:
                q = self.probs(out.logits[rand], [seqs[active[n]] for n in rand])
                for row, n in enumerate(rand):
                    i = active[n]
                    tokens[n] = torch.multinomial(q[row], 1, generator=seqs[i].generator or self.generator)[0]
                    q_rows[i].append(q[row])
            for i, token in zip(active, tokens.tolist()):
                views[i].num_computed = views[i].num_tokens
                views[i].token_ids.append(token)
                drafts[i].append(token)
            ks = [k if i in active else min(k, r) for i, k in enumerate(ks)]  # out of room: no more drafts
        for seq, view, d, qs in zip(seqs, views, drafts, q_rows):
            self.kv[seq].tokens = view.token_ids[: view.num_computed]  # the last draft was never fed
            seq.spec_token_ids = d
            seq.spec_draft_probs = torch.stack(qs) if qs else None

    def _view(self, seq: Sequence) -> DraftView:
        """The draft's record of `seq`, cut back to the tokens that still agree with it."""
        kv = self.kv.setdefault(seq, _DraftKV([], []))
        n = min(len(kv.tokens), seq.num_tokens)
        for i in range(max(0, n - self.k_max), n):  # the target's tokens only grow: only the drafts can differ
            if kv.tokens[i] != seq.token_ids[i]:
                n = i
                break
        del kv.tokens[n:]
        self.blocks.truncate(kv.table, n)
        return DraftView(list(seq.token_ids), n, kv.table)

    def _room(self, seq: Sequence, view: DraftView) -> bool:
        """Grow the draft table for this round's tokens; drops idle sequences' draft K/V if it must."""
        table = view.block_table
        if not self.blocks.can_grow(table, view.num_tokens):
            for idle in [s for s in self.kv if s.status != Status.RUNNING and s is not seq]:
                self.blocks.release(self.kv.pop(idle).table)
                if self.blocks.can_grow(table, view.num_tokens):
                    break
            else:
                return False
        self.blocks.grow(table, view.num_tokens)
        return True
