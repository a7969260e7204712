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
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch

from tinyserve.config import SpeculativeConfig
from tinyserve.kv.block_manager import BlockManager
from tinyserve.models.loader import model_config, resolve_model
from tinyserve.speculative.cost import StepCost, row_counts
from tinyserve.speculative.target import Drafted, Target
from tinyserve.worker.runner import DECODE_ROWS, SeqView
from tinyserve.worker.served_model import serve_model

log = logging.getLogger(__name__)


@dataclass
class _DraftKV:
    tokens: list[int]  # the tokens at positions 0.. whose K/V the draft pool holds
    table: list[int]


class DraftModelProposer:
    def __init__(self, cfg: SpeculativeConfig, target: Target) -> None:
        src = target.source if cfg.method == "self" else resolve_model(cfg.model)
        mc = model_config(src)
        if mc.vocab_size != target.model_config.vocab_size:
            raise ValueError(f"speculative_config.model: the draft's vocabulary ({mc.vocab_size} tokens) is not the "
                             f"target's ({target.model_config.vocab_size}); a draft must share the target's tokenizer")
        quant = cfg.quantization or ("auto" if cfg.method == "draft_model"
                                     else "gguf" if src.stored_form == "gguf" else "int4")
        if cfg.method == "self" and quant in ("auto", target.quantization):
            raise ValueError(f"speculative_config.quantization: a self-speculation draft needs a weight mode other "
                             f"than the target's ({target.quantization!r})")
        self.max_len = min(target.max_len, mc.max_position_embeddings)
        self.k_max = cfg.num_speculative_tokens
        config = target.config
        # As many tokens as the target's pool: whatever the target holds, its draft can hold too.
        num_blocks = target.num_blocks
        served = serve_model(config, src, mc, quant, self.max_len, num_blocks, config.max_num_seqs * DECODE_ROWS,
                             "off" if config.compile == "off" else "blocking")
        self.runner = served.runner
        self.quantization = served.quantization
        self.cost = StepCost(self.runner.decode_step_seconds(row_counts(config.max_num_seqs))) if cfg.adaptive else None
        self.blocks = BlockManager(num_blocks, config.block_size, enable_caching=False)
        self.kv: dict[Drafted, _DraftKV] = {}
        self.probs = target.probs  # the draft samples as the target does: temperature, top-k/p, min-p
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed + 1)
        log.info("draft model %s (%s) for speculation: %d KV blocks", src.name, self.quantization, num_blocks)

    def forget(self, live: AbstractSet[object]) -> None:
        for seq in [s for s in self.kv if s not in live]:
            self.blocks.release(self.kv.pop(seq).table)

    def propose(self, seqs: Sequence[Drafted], ks: list[int], running: AbstractSet[object]) -> None:
        try:
            self._propose(seqs, ks, running)
        except Exception as e:  # a draft failure costs the speedup, never a request
            log.warning("drafting failed (%s: %s); dropping the drafts and the draft KV", type(e).__name__, e)
            for seq in seqs:
                seq.spec_token_ids, seq.spec_draft_probs = [], None
            for kv in self.kv.values():
                self.blocks.release(kv.table)
            self.kv.clear()

    @torch.inference_mode()
    def _propose(self, seqs: Sequence[Drafted], ks: list[int], running: AbstractSet[object]) -> None:
        views = [self._view(seq) for seq in seqs]
        ks = [min(k, self.max_len - seq.num_tokens) for seq, k in zip(seqs, ks)]
        drafts: list[list[int]] = [[] for _ in seqs]
        q_rows: list[list[torch.Tensor]] = [[] for _ in seqs]
        for r in range(max(ks, default=0)):
            active = [i for i, k in enumerate(ks) if k > r and self._room(seqs[i], views[i], running)]
            if not active:
                break
            out = self.runner.execute([views[i] for i in active],
                                      [views[i].num_tokens - views[i].num_computed for i in active])
            rand = [n for n, i in enumerate(active) if not seqs[i].params.greedy]
            tokens = out.logits.argmax(-1)
            if rand:
                q = self.probs(out.logits[rand], [seqs[active[n]].params for n in rand])
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

    def _view(self, seq: Drafted) -> SeqView:
        """The draft's record of `seq`, cut back to the tokens that still agree with it."""
        kv = self.kv.setdefault(seq, _DraftKV([], []))
        n = min(len(kv.tokens), seq.num_tokens)
        for i in range(max(0, n - self.k_max), n):  # the target's tokens only grow: only the drafts can differ
            if kv.tokens[i] != seq.token_ids[i]:
                n = i
                break
        del kv.tokens[n:]
        self.blocks.truncate(kv.table, n)
        return SeqView(list(seq.token_ids), kv.table, n)

    def _room(self, seq: Drafted, view: SeqView, running: AbstractSet[object]) -> bool:
        """Grow the draft table for this round's tokens; drops idle sequences' draft K/V if it must."""
        table = view.block_table
        if not self.blocks.can_grow(table, view.num_tokens):
            for idle in [s for s in self.kv if s not in running and s is not seq]:
                self.blocks.release(self.kv.pop(idle).table)
                if self.blocks.can_grow(table, view.num_tokens):
                    break
            else:
                return False
        self.blocks.grow(table, view.num_tokens)
        return True
