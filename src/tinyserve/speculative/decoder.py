"""The engine's speculative decoder: before each step, drafts for the running decodes; after it,
counts what verification accepted (the verification itself is the sampler's, verify.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

from tinyserve.config import SpeculativeConfig
from tinyserve.speculative.controller import DraftPolicy
from tinyserve.speculative.cost import StepCost, row_counts
from tinyserve.speculative.ngram import propose_ngram
from tinyserve.speculative.target import Drafted, Target

log = logging.getLogger(__name__)


class Proposer(Protocol):
    cost: StepCost | None  # a draft step by rows (None: free)

    def propose(self, seqs: Sequence[Drafted], ks: list[int], running: AbstractSet[object]) -> None:
        """Set each seqs[i].spec_token_ids to at most ks[i] drafts (and spec_draft_probs); `running`:
        every running sequence (a proposer short of memory may drop what it keeps for the others)."""

    def forget(self, live: AbstractSet[object]) -> None:
        """Drop whatever is kept for sequences no longer alive."""


class NgramProposer:
    cost: StepCost | None = None  # a dictionary lookup: nothing next to a model step

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.n_max, self.n_min = cfg.prompt_lookup_max, cfg.prompt_lookup_min

    def propose(self, seqs: Sequence[Drafted], ks: list[int], running: AbstractSet[object]) -> None:
        for seq, k in zip(seqs, ks):
            seq.spec_token_ids = propose_ngram(seq.token_ids, k, self.n_max, self.n_min)

    def forget(self, live: AbstractSet[object]) -> None:
        pass


@dataclass
class SpecStats:
    """vLLM's counters: verification rounds with drafts, tokens drafted, drafts accepted (and by position).
    Acceptance rate = accepted / drafted; mean accepted length = 1 + accepted / drafts (server/metrics.py)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_by_position: list[int] = field(default_factory=list)


class SpecDecoder:
    def __init__(self, cfg: SpeculativeConfig, proposer: Proposer, target_cost: StepCost | None) -> None:
        self.cfg = cfg
        self.proposer = proposer
        self.policy = DraftPolicy(cfg.num_speculative_tokens, cfg.adaptive, target_cost, proposer.cost)
        self.stats = SpecStats(accepted_by_position=[0] * cfg.num_speculative_tokens)

    @classmethod
    def build(cls, cfg: SpeculativeConfig, target: Target) -> SpecDecoder:
        proposer: Proposer
        if cfg.method == "ngram":
            proposer = NgramProposer(cfg)
        else:
            from tinyserve.speculative.draft import DraftModelProposer  # loads a model: only when asked

            proposer = DraftModelProposer(cfg, target)
        target_cost = None
        if cfg.adaptive:
            rows = row_counts(target.config.max_num_seqs * (1 + cfg.num_speculative_tokens))
            target_cost = StepCost(target.runner.decode_step_seconds(rows))
            log.info("decode step by rows (ms): %s", ", ".join(f"{r}: {1e3 * target_cost(r):.1f}" for r in rows))
        return cls(cfg, proposer, target_cost)

    def propose(self, running: Sequence[Drafted]) -> None:
        """Drafts for the running decodes, as many each as the policy finds worth it (and as fit)."""
        decodes = [s for s in running if s.num_uncomputed == 1]
        limit = self.cfg.disable_by_batch_size
        if not decodes or (limit is not None and len(decodes) > limit):
            return
        k = self.policy.choose(list(decodes))
        seqs, ks = [], []
        for seq in decodes:
            room = seq.max_output_tokens() - len(seq.output_token_ids) - 1  # a round emits up to k + 1
            if min(k, room) > 0:
                seqs.append(seq)
                ks.append(min(k, room))
        if seqs:
            self.proposer.propose(seqs, ks, set(running))

    def forget(self, live: AbstractSet[object]) -> None:
        """Drop the state of every sequence not in `live` (finished, aborted, failed): the engine calls
        this after each step, so a finished sequence's draft K/V goes back at once."""
        self.policy.forget(live)
        self.proposer.forget(live)

    def record(self, seq: Drafted, drafted: int, accepted: int) -> None:
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += drafted
        s.num_accepted_tokens += accepted
        for i in range(accepted):
            s.accepted_by_position[i] += 1
        self.policy.update(seq, drafted, accepted)
